//! Snapshots, restores, clones, expansion, modification and health, on real devices.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use plinth_proto::csi_v1::{self as csi, group_controller_client::GroupControllerClient};
use plinth_tests::*;
use tonic::Code;

struct Mounted {
    id: String,
    staging: PathBuf,
    target: PathBuf,
}

async fn create(c: &mut Clients, request: csi::CreateVolumeRequest) -> csi::Volume {
    c.controller.create_volume(request).await.expect("CreateVolume").into_inner().volume.expect("volume")
}

async fn mount(c: &mut Clients, sandbox: &Sandbox, id: &str, fs: &str) -> Mounted {
    let staging = sandbox.root().join(format!("staging-{id}"));
    let target = sandbox.root().join(format!("target-{id}"));
    c.node.node_stage_volume(stage_request(id, &staging, mount_cap(fs))).await.expect("stage");
    c.node.node_publish_volume(publish_request(id, &staging, &target, mount_cap(fs))).await.expect("publish");
    Mounted { id: id.to_owned(), staging, target }
}

async fn unmount(c: &mut Clients, m: &Mounted) {
    c.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: m.id.clone(),
            target_path: m.target.display().to_string(),
        })
        .await
        .expect("unpublish");
    c.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: m.id.clone(),
            staging_target_path: m.staging.display().to_string(),
        })
        .await
        .expect("unstage");
}

fn write(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

async fn snapshot(c: &mut Clients, name: &str, source: &str) -> csi::Snapshot {
    c.controller
        .create_snapshot(csi::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: source.into(),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot")
}

fn from_snapshot(name: &str, bytes: i64, fs: &str, snapshot_id: &str) -> csi::CreateVolumeRequest {
    let mut request = create_request(name, bytes, mount_cap(fs));
    request.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: snapshot_id.into(),
        })),
    });
    request
}

fn from_volume(name: &str, bytes: i64, fs: &str, volume_id: &str) -> csi::CreateVolumeRequest {
    let mut request = create_request(name, bytes, mount_cap(fs));
    request.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: volume_id.into(),
        })),
    });
    request
}

/// ext4's online resize needs CAP_SYS_RESOURCE, which some sandboxes drop even for root.
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn fs_total_bytes(path: &Path) -> u64 {
    plinth_engine::sys::statfs::usage(path).unwrap().total_bytes
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn restore_holds_data_from_before_the_snapshot_and_not_after() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut c = plinth.clients().await;
    for fs in ["ext4", "xfs", "btrfs"] {
        let size = 320 * MIB;
        let source = create(&mut c, create_request(&format!("src-{fs}"), size, mount_cap(fs))).await;
        let m = mount(&mut c, &sandbox, &source.volume_id, fs).await;
        write(&m.target.join("before"), b"taken");
        // Snapshot while mounted and in use: the filesystem is frozen for the copy.
        let snap = snapshot(&mut c, &format!("snap-{fs}"), &source.volume_id).await;
        assert!(snap.ready_to_use);
        assert_eq!(snap.size_bytes, size);
        assert!(snap.creation_time.as_ref().unwrap().seconds > 1_700_000_000);
        write(&m.target.join("after"), b"too late");
        std::fs::write(m.target.join("before"), b"changed later").unwrap();

        // Restore into a larger volume: the filesystem grows to fill it on stage.
        let restored = create(&mut c, from_snapshot(&format!("restored-{fs}"), size * 2, fs, &snap.snapshot_id)).await;
        assert_eq!(restored.capacity_bytes, size * 2);
        let r = mount(&mut c, &sandbox, &restored.volume_id, fs).await;
        assert_eq!(std::fs::read(r.target.join("before")).unwrap(), b"taken", "{fs}");
        assert!(!r.target.join("after").exists(), "{fs}: data written after the snapshot is absent");
        assert!(fs_total_bytes(&r.target) > size as u64, "{fs}: restored filesystem grew to the bigger volume");

        // Deleting the snapshot (and the source) never touches the restored volume.
        unmount(&mut c, &m).await;
        c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() })
            .await
            .unwrap();
        c.controller
            .delete_volume(csi::DeleteVolumeRequest { volume_id: source.volume_id.clone(), ..Default::default() })
            .await
            .expect("a volume with snapshots can be deleted");
        assert_eq!(std::fs::read(r.target.join("before")).unwrap(), b"taken");
        unmount(&mut c, &r).await;
        c.controller
            .delete_volume(csi::DeleteVolumeRequest { volume_id: restored.volume_id.clone(), ..Default::default() })
            .await
            .unwrap();
    }
    assert!(sandbox.pool_images().is_empty(), "{:?}", sandbox.pool_images());

    let too_small = c.controller.create_volume(from_snapshot("tiny", MIB, "ext4", "snap-0")).await.unwrap_err();
    assert_eq!(too_small.code(), Code::NotFound, "unknown snapshot");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn xfs_clone_mounts_beside_its_mounted_source_and_is_independent() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut c = plinth.clients().await;
    let source = create(&mut c, create_request("origin", 320 * MIB, mount_cap("xfs"))).await;
    let m = mount(&mut c, &sandbox, &source.volume_id, "xfs").await;
    write(&m.target.join("shared"), b"original");
    let clone = create(&mut c, from_volume("copy", 320 * MIB, "xfs", &source.volume_id)).await;
    assert!(matches!(
        clone.content_source.as_ref().and_then(|s| s.r#type.as_ref()),
        Some(csi::volume_content_source::Type::Volume(v)) if v.volume_id == source.volume_id
    ));
    // Same XFS UUID as the mounted source: mounts only because plinth never lets it collide.
    let k = mount(&mut c, &sandbox, &clone.volume_id, "xfs").await;
    assert_eq!(std::fs::read(k.target.join("shared")).unwrap(), b"original");
    write(&k.target.join("shared"), b"changed in the clone");
    write(&m.target.join("only-in-source"), b"x");
    assert_eq!(std::fs::read(m.target.join("shared")).unwrap(), b"original", "source unaffected by the clone");
    assert!(!k.target.join("only-in-source").exists(), "clone unaffected by the source");

    let rounded = create(&mut c, from_volume("rounded", 310 * MIB, "xfs", &source.volume_id)).await;
    assert_eq!(rounded.capacity_bytes, 320 * MIB, "a clone is at least its source's size");
    let mut limited = from_volume("limited", 310 * MIB, "xfs", &source.volume_id);
    limited.capacity_range.as_mut().unwrap().limit_bytes = 310 * MIB;
    assert_eq!(c.controller.create_volume(limited).await.unwrap_err().code(), Code::OutOfRange);
    let other_fs = c.controller.create_volume(from_volume("as-ext4", 320 * MIB, "ext4", &source.volume_id)).await;
    assert_eq!(other_fs.unwrap_err().code(), Code::InvalidArgument, "a copy keeps its filesystem");
    unmount(&mut c, &k).await;
    unmount(&mut c, &m).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn online_expansion_under_a_writer_keeps_every_byte() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut c = plinth.clients().await;
    for fs in ["ext4", "xfs", "btrfs"] {
        let size = 320 * MIB;
        let volume = create(&mut c, create_request(&format!("grow-{fs}"), size, mount_cap(fs))).await;
        let m = mount(&mut c, &sandbox, &volume.volume_id, fs).await;
        let before = fs_total_bytes(&m.target);

        // A writer appends a known pattern the whole time.
        let stop = Arc::new(AtomicBool::new(false));
        let file = m.target.join("stream");
        let writer = {
            let (stop, file) = (Arc::clone(&stop), file.clone());
            std::thread::spawn(move || {
                let mut out = std::fs::File::create(&file).unwrap();
                let mut written: u64 = 0;
                while !stop.load(Ordering::Relaxed) && written < 200 * 1024 * 1024 {
                    let block: Vec<u8> = (0..65536u64).map(|i| ((written + i) % 251) as u8).collect();
                    out.write_all(&block).unwrap();
                    written += block.len() as u64;
                }
                out.sync_all().unwrap();
                written
            })
        };
        let expanded = c
            .controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: volume.volume_id.clone(),
                capacity_range: Some(csi::CapacityRange { required_bytes: size * 2, limit_bytes: 0 }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(expanded.capacity_bytes, size * 2);
        assert!(expanded.node_expansion_required);
        let node_expand = c
            .node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: volume.volume_id.clone(),
                volume_path: m.target.display().to_string(),
                capacity_range: Some(csi::CapacityRange { required_bytes: size * 2, limit_bytes: 0 }),
                ..Default::default()
            })
            .await;
        let online = fs != "ext4" || has_cap_sys_resource();
        match &node_expand {
            Ok(response) => {
                assert!(online, "{fs}: online growth reported done where it cannot happen");
                assert_eq!(response.get_ref().capacity_bytes, size * 2, "{fs}: the device grew");
            }
            Err(status) => {
                assert!(!online, "{fs}: {status:?}");
                assert!(status.message().contains("CAP_SYS_RESOURCE"), "{fs}: the error says why: {status:?}");
            }
        }
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().unwrap();
        let check = |target: &Path| {
            let mut data = Vec::new();
            std::fs::File::open(target.join("stream")).unwrap().read_to_end(&mut data).unwrap();
            assert_eq!(data.len() as u64, written, "{fs}: every byte written is there");
            assert!(data.iter().enumerate().all(|(i, b)| *b == (i as u64 % 251) as u8), "{fs}: and intact");
        };
        check(&m.target);
        let m = if online {
            m
        } else {
            // Without CAP_SYS_RESOURCE (this sandbox) ext4 grows offline, on the next stage.
            unmount(&mut c, &m).await;
            let m = mount(&mut c, &sandbox, &volume.volume_id, fs).await;
            check(&m.target);
            m
        };
        assert!(fs_total_bytes(&m.target) > before + (size as u64) / 2, "{fs}: the filesystem grew");

        let shrink = c
            .controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: volume.volume_id.clone(),
                capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: size }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(shrink.code(), Code::OutOfRange, "shrinking is refused");
        unmount(&mut c, &m).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn offline_expansion_grows_the_filesystem_on_next_stage() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &["--pool-capacity", "1GiB"]);
    let mut c = plinth.clients().await;
    let volume = create(&mut c, create_request("offline", 64 * MIB, mount_cap("ext4"))).await;
    let m = mount(&mut c, &sandbox, &volume.volume_id, "ext4").await;
    write(&m.target.join("keep"), b"kept");
    let before = fs_total_bytes(&m.target);
    unmount(&mut c, &m).await;
    let grow = |bytes: i64| csi::ControllerExpandVolumeRequest {
        volume_id: volume.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        ..Default::default()
    };
    c.controller.controller_expand_volume(grow(256 * MIB)).await.unwrap();
    let err = c.controller.controller_expand_volume(grow(2048 * MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "growth beyond the pool is refused");
    let m = mount(&mut c, &sandbox, &volume.volume_id, "ext4").await;
    assert!(fs_total_bytes(&m.target) > before * 3, "grown on stage");
    assert_eq!(std::fs::read(m.target.join("keep")).unwrap(), b"kept");
    unmount(&mut c, &m).await;
}

fn pool_free_bytes(dir: &Path) -> u64 {
    plinth_engine::sys::statfs::usage(dir).unwrap().free_bytes
}

/// A pool on its own loop-mounted filesystem inside the sandbox.
fn make_pool_filesystem(sandbox: &Sandbox, fs: &str) -> PathBuf {
    let image = sandbox.path().join(format!("{fs}-pool.img"));
    std::fs::File::create(&image).unwrap().set_len(1 << 30).unwrap();
    let device = plinth_engine::sys::loopdev::attach(&image, false).unwrap();
    let mut mkfs = std::process::Command::new(format!("mkfs.{fs}"));
    if fs == "xfs" {
        mkfs.args(["-q", "-m", "reflink=1"]);
    } else {
        mkfs.arg("-q");
    }
    assert!(mkfs.arg(device.path()).status().unwrap().success());
    let mount_point = sandbox.path().join(format!("{fs}-pool"));
    std::fs::create_dir_all(&mount_point).unwrap();
    plinth_engine::sys::mount::mount_filesystem(
        &device.path(),
        &mount_point,
        fs,
        plinth_engine::sys::mount::MsFlags::empty(),
        "",
    )
    .unwrap();
    mount_point
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn snapshots_reflink_on_xfs_pools_and_copy_sparsely_elsewhere() {
    require_root!();
    for (pool_fs, expected_method) in [("xfs", "reflink"), ("ext4", "sparse-copy")] {
        let sandbox = Sandbox::new();
        let pool_mount = make_pool_filesystem(&sandbox, pool_fs);
        let data_dir = pool_mount.join("plinth");
        let plinth = Plinth::start_with_data_dir(&sandbox, &data_dir, &[]);
        let mut c = plinth.clients().await;
        let volume = create(&mut c, create_request("busy", 256 * MIB, mount_cap("ext4"))).await;
        let m = mount(&mut c, &sandbox, &volume.volume_id, "ext4").await;
        let payload: Vec<u8> = (0..64 * MIB as usize).map(|i| (i % 253) as u8).collect();
        write(&m.target.join("payload"), &payload);

        let free_before = pool_free_bytes(&pool_mount);
        let snap = snapshot(&mut c, "snap", &volume.volume_id).await;
        let free_after = pool_free_bytes(&pool_mount);
        let record = snapshot_record_in(&data_dir, &snap.snapshot_id);
        assert_eq!(record["copy_method"], expected_method, "pool on {pool_fs}");
        let consumed = free_before.saturating_sub(free_after);
        let image = data_dir.join("pool/snapshots").join(format!("{}.img", snap.snapshot_id));
        let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image).unwrap()) * 512;
        if expected_method == "reflink" {
            assert!(consumed < 16 * MIB as u64, "a reflink costs no data blocks (consumed {consumed})");
        } else {
            assert!(allocated >= 64 * MIB as u64, "the copy holds the data ({allocated})");
            assert!(allocated < 200 * MIB as u64, "and keeps the 256 MiB image's holes ({allocated})");
        }
        let restored = create(&mut c, from_snapshot("restored", 256 * MIB, "ext4", &snap.snapshot_id)).await;
        let r = mount(&mut c, &sandbox, &restored.volume_id, "ext4").await;
        assert!(std::fs::read(r.target.join("payload")).unwrap() == payload, "restored bytes identical");
        unmount(&mut c, &r).await;
        unmount(&mut c, &m).await;
        drop(c);
        drop(plinth);
    }
}

/// One 4 KiB record of the busy writer below: its index, then a fill derived from it.
fn record_bytes(index: u64) -> Vec<u8> {
    let mut record = vec![(index % 251) as u8; 4096];
    record[..8].copy_from_slice(&index.to_le_bytes());
    record
}

/// How many records `path` holds, checking every one is whole and in order.
fn whole_records(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len() % 4096, 0, "a torn record: {} bytes", bytes.len());
    for (index, record) in bytes.chunks(4096).enumerate() {
        assert!(record == record_bytes(index as u64).as_slice(), "record {index} is not what was written");
    }
    (bytes.len() / 4096) as u64
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn reflink_copies_of_a_busy_volume_hold_every_write_made_before_them() {
    // On a reflink pool a mounted source is flushed, not frozen: the clone itself must be one
    // instant of the device. A writer appends and fsyncs records throughout; every copy must
    // mount (journal replayed), hold every record acknowledged before it was asked for, whole,
    // and a file written without fsync just before it.
    require_root!();
    for fs in ["ext4", "xfs"] {
        let sandbox = Sandbox::new();
        let data_dir = make_pool_filesystem(&sandbox, "xfs").join("plinth");
        let plinth = Plinth::start_with_data_dir(&sandbox, &data_dir, &[]);
        let mut c = plinth.clients().await;
        let size = if fs == "xfs" { 320 * MIB } else { 128 * MIB };
        let volume = create(&mut c, create_request(&format!("busy-{fs}"), size, mount_cap(fs))).await;
        let m = mount(&mut c, &sandbox, &volume.volume_id, fs).await;
        let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(std::sync::atomic::AtomicU64::new(0)));
        let writer = {
            let (stop, acked, path) = (Arc::clone(&stop), Arc::clone(&acked), m.target.join("log"));
            std::thread::spawn(move || {
                let mut file = std::fs::File::create(path).unwrap();
                let mut index = 0;
                while !stop.load(Ordering::SeqCst) && index < 8_000 {
                    file.write_all(&record_bytes(index)).unwrap();
                    file.sync_data().unwrap();
                    index += 1;
                    acked.store(index, Ordering::SeqCst);
                }
            })
        };
        for round in 0..4u64 {
            while acked.load(Ordering::SeqCst) < 50 * (round + 1) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let note = format!("unsynced-{round}");
            std::fs::write(m.target.join(&note), note.as_bytes()).unwrap();
            let before = acked.load(Ordering::SeqCst);
            let name = format!("copy-{fs}-{round}");
            let copy = if round % 2 == 0 {
                let snap = snapshot(&mut c, &name, &volume.volume_id).await;
                let record = snapshot_record_in(&data_dir, &snap.snapshot_id);
                assert_eq!(record["copy_method"], "reflink");
                create(&mut c, from_snapshot(&format!("{name}-restored"), size, fs, &snap.snapshot_id)).await
            } else {
                create(&mut c, from_volume(&name, size, fs, &volume.volume_id)).await
            };
            // Checked while the writer goes on: the copy is independent of its source.
            let r = mount(&mut c, &sandbox, &copy.volume_id, fs).await;
            let held = whole_records(&r.target.join("log"));
            assert!(held >= before, "{fs}: {held} records, but {before} were acknowledged before the copy");
            assert_eq!(std::fs::read_to_string(r.target.join(&note)).unwrap(), note, "{fs}: unsynced data flushed");
            unmount(&mut c, &r).await;
            c.controller
                .delete_volume(csi::DeleteVolumeRequest { volume_id: copy.volume_id, ..Default::default() })
                .await
                .expect("delete the copy");
        }
        assert!(!writer.is_finished(), "{fs}: the writer ran throughout");
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        unmount(&mut c, &m).await;
        drop(c);
        drop(plinth);
    }
}

fn snapshot_record_in(data_dir: &Path, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(data_dir.join("snapshots").join(format!("{id}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn group_snapshot_captures_every_member_together() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut c = plinth.clients().await;
    let mut group_client = GroupControllerClient::new(Clients::channel(&sandbox.socket()).await);
    let a = create(&mut c, create_request("db", 64 * MIB, mount_cap("ext4"))).await;
    let b = create(&mut c, create_request("wal", 128 * MIB, mount_cap("btrfs"))).await;
    let ma = mount(&mut c, &sandbox, &a.volume_id, "ext4").await;
    let mb = mount(&mut c, &sandbox, &b.volume_id, "btrfs").await;
    write(&ma.target.join("table"), b"row 1");
    write(&mb.target.join("log"), b"commit 1");
    let request = csi::CreateVolumeGroupSnapshotRequest {
        name: "consistent".into(),
        source_volume_ids: vec![a.volume_id.clone(), b.volume_id.clone()],
        ..Default::default()
    };
    let group = group_client.create_volume_group_snapshot(request.clone()).await.unwrap().into_inner();
    let group = group.group_snapshot.unwrap();
    assert_eq!(group.snapshots.len(), 2);
    assert!(group.snapshots.iter().all(|s| s.group_snapshot_id == group.group_snapshot_id && s.ready_to_use));
    let again = group_client.create_volume_group_snapshot(request).await.unwrap().into_inner();
    assert_eq!(again.group_snapshot.unwrap().group_snapshot_id, group.group_snapshot_id, "idempotent by name");
    write(&ma.target.join("table"), b"row 2");

    let member_of_a = group.snapshots.iter().find(|s| s.source_volume_id == a.volume_id).unwrap();
    let restored = create(&mut c, from_snapshot("db-restored", 64 * MIB, "ext4", &member_of_a.snapshot_id)).await;
    let r = mount(&mut c, &sandbox, &restored.volume_id, "ext4").await;
    assert_eq!(std::fs::read(r.target.join("table")).unwrap(), b"row 1");
    unmount(&mut c, &r).await;

    let alone = c
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: member_of_a.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(alone.code(), Code::InvalidArgument, "a member goes with its group");
    let got = group_client
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.group_snapshot.unwrap().snapshots.len(), 2);
    let mismatch = group_client
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            snapshot_ids: vec![member_of_a.snapshot_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(mismatch.code(), Code::InvalidArgument);
    group_client
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let listed = c.controller.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries.is_empty(), "deleting the group removes its members");
    unmount(&mut c, &ma).await;
    unmount(&mut c, &mb).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn modify_preallocates_and_health_reports_what_broke() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut c = plinth.clients().await;
    let mut request = create_request("labelled", 64 * MIB, mount_cap("ext4"));
    request.parameters.insert("mkfsOptions".into(), "-L plinthdata -I 256".into());
    let volume = create(&mut c, request).await;
    let image = sandbox.data_dir().join("pool").join(format!("{}.img", volume.volume_id));
    let allocated = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image).unwrap()) * 512;
    assert!(allocated() < 8 * MIB as u64, "thin to start with");

    let modify = |params: &[(&str, &str)]| csi::ControllerModifyVolumeRequest {
        volume_id: volume.volume_id.clone(),
        mutable_parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    c.controller.controller_modify_volume(modify(&[("provisioning", "thick")])).await.unwrap();
    assert!(allocated() >= 64 * MIB as u64, "modify to thick preallocates every block");
    let back = c.controller.controller_modify_volume(modify(&[("provisioning", "thin")])).await.unwrap_err();
    assert_eq!(back.code(), Code::InvalidArgument);
    let unknown = c.controller.controller_modify_volume(modify(&[("iops", "9000")])).await.unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);

    let m = mount(&mut c, &sandbox, &volume.volume_id, "ext4").await;
    let device = loop_devices_under(sandbox.path()).pop().unwrap();
    let label = std::process::Command::new("blkid").args(["-o", "value", "-s", "LABEL"]).arg(&device).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "plinthdata", "mkfsOptions reached mkfs");

    let get = || csi::ControllerGetVolumeRequest { volume_id: volume.volume_id.clone() };
    let healthy = c.controller.controller_get_volume(get()).await.unwrap().into_inner();
    let condition = healthy.status.unwrap().volume_condition.unwrap();
    assert!(!condition.abnormal, "{condition:?}");
    let stats = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: volume.volume_id.clone(),
            volume_path: m.target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);

    // Someone unmounts the volume behind plinth's back.
    nix::mount::umount2(&m.target, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let broken = c.controller.controller_get_volume(get()).await.unwrap().into_inner();
    let condition = broken.status.unwrap().volume_condition.unwrap();
    assert!(condition.abnormal && condition.message.contains("vanished"), "{condition:?}");
    let listed = c.controller.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries[0].status.as_ref().unwrap().volume_condition.as_ref().unwrap().abnormal);
    unmount(&mut c, &m).await;

    let bad_mkfs = {
        let mut r = create_request("bad-mkfs", 64 * MIB, mount_cap("ext4"));
        r.parameters.insert("mkfsOptions".into(), "-E discard".into());
        c.controller.create_volume(r).await.unwrap_err()
    };
    assert_eq!(bad_mkfs.code(), Code::InvalidArgument);

    std::fs::remove_file(&image).unwrap();
    let gone = c.controller.controller_get_volume(get()).await.unwrap().into_inner();
    let condition = gone.status.unwrap().volume_condition.unwrap();
    assert!(condition.abnormal && condition.message.contains("missing"), "{condition:?}");
}
