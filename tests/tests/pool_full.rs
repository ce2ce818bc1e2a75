//! A pool whose filesystem fills up (something outside plinth wrote into it): mkfs at stage, a
//! snapshot copy, an expansion and a thick preallocation each get a clear RESOURCE_EXHAUSTED and
//! leave nothing half-made; once space is back, the same calls succeed.

use std::path::{Path, PathBuf};
use std::process::Command;

use plinth_proto::csi_v1 as csi;
use plinth_tests::*;
use tonic::Code;

/// A 320 MiB ext4 filesystem (no reserved blocks) on a loop device, mounted in the sandbox: the
/// pool's filesystem, small enough to fill.
fn small_pool_filesystem(sandbox: &Sandbox) -> PathBuf {
    let image = sandbox.path().join("poolfs.img");
    let mount_point = sandbox.path().join("poolfs");
    std::fs::File::create(&image).unwrap().set_len(320 << 20).unwrap();
    let run = |program: &str, args: &[&str]| {
        let output = Command::new(program).args(args).output().unwrap();
        assert!(output.status.success(), "{program}: {}", String::from_utf8_lossy(&output.stderr));
    };
    run("mkfs.ext4", &["-q", "-m", "0", image.to_str().unwrap()]);
    std::fs::create_dir_all(&mount_point).unwrap();
    run("mount", &["-o", "loop", image.to_str().unwrap(), mount_point.to_str().unwrap()]);
    mount_point.join("data")
}

/// Fills the pool filesystem until `leave` bytes are left available.
fn fill(data_dir: &Path, leave: u64) -> PathBuf {
    let junk = data_dir.parent().unwrap().join("junk");
    let stat = nix::sys::statvfs::statvfs(data_dir).unwrap();
    let available = stat.blocks_available() * stat.fragment_size();
    let mut size = available.saturating_sub(leave);
    let file = std::fs::File::create(&junk).unwrap();
    // The junk file's own extent tree takes a little space too: back off until it fits.
    while let Err(nix::Error::ENOSPC) =
        nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, size as i64)
    {
        size = size.saturating_sub(256 << 10);
    }
    file.sync_all().unwrap();
    junk
}

fn leftovers(data_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for dir in
        [data_dir.join("pool"), data_dir.join("pool/snapshots"), data_dir.join("volumes"), data_dir.join("snapshots")]
    {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".partial") || name.starts_with(".tmp-") {
                found.push(name);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn a_full_pool_filesystem_is_resource_exhausted_and_leaves_nothing_half_made() {
    require_root!();
    let sandbox = Sandbox::new();
    let data_dir = small_pool_filesystem(&sandbox);
    let plinth = Plinth::start_with_data_dir(&sandbox, &data_dir, &[]);
    let mut c = plinth.clients().await;
    let staging = sandbox.root().join("staging");
    let target = sandbox.root().join("target");

    // mkfs at the first stage.
    let fresh = c.controller.create_volume(create_request("fresh", 64 * MIB, mount_cap("ext4"))).await.unwrap();
    let fresh_id = fresh.into_inner().volume.unwrap().volume_id;
    let junk = fill(&data_dir, 0);
    let err = c.node.node_stage_volume(stage_request(&fresh_id, &staging, mount_cap("ext4"))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("full"), "{}", err.message());
    assert!(loop_devices_under(&data_dir).is_empty(), "the failed stage detached its device");
    assert!(mounts_under(&sandbox.root()).is_empty(), "and mounted nothing");
    std::fs::remove_file(&junk).unwrap();
    c.node.node_stage_volume(stage_request(&fresh_id, &staging, mount_cap("ext4"))).await.expect("stage with room");
    c.node.node_publish_volume(publish_request(&fresh_id, &staging, &target, mount_cap("ext4"))).await.unwrap();
    let data = vec![7u8; 32 << 20];
    std::fs::write(target.join("data"), &data).unwrap();
    nix::unistd::sync();

    // A snapshot copy (the copying path: ext4 pools have no reflinks).
    let junk = fill(&data_dir, 4 << 20);
    let snapshot =
        || csi::CreateSnapshotRequest { name: "snap".into(), source_volume_id: fresh_id.clone(), ..Default::default() };
    let err = c.controller.create_snapshot(snapshot()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(std::fs::read_dir(data_dir.join("pool/snapshots")).unwrap().next().is_none(), "no partial snapshot");
    assert!(std::fs::read_dir(data_dir.join("snapshots")).unwrap().next().is_none(), "no snapshot record");
    // The source filesystem was thawed: it takes writes.
    std::fs::write(target.join("after"), b"still writable").unwrap();
    std::fs::remove_file(&junk).unwrap();
    c.controller.create_snapshot(snapshot()).await.expect("snapshot with room");

    // Expansion and preallocation: refused by the accounting before any write.
    let thick = {
        let mut request = create_request("thick", 32 * MIB, block_cap());
        request.parameters.insert("provisioning".into(), "thick".into());
        c.controller.create_volume(request).await.unwrap().into_inner().volume.unwrap().volume_id
    };
    let junk = fill(&data_dir, 16 << 20);
    let grow = |id: &str| csi::ControllerExpandVolumeRequest {
        volume_id: id.to_owned(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    let err = c.controller.controller_expand_volume(grow(&thick)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let mut another = create_request("another-thick", 64 * MIB, block_cap());
    another.parameters.insert("provisioning".into(), "thick".into());
    let err = c.controller.create_volume(another.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        std::fs::read_dir(data_dir.join("pool")).unwrap().filter(|e| e.as_ref().unwrap().path().is_file()).count(),
        2,
        "only the two volumes' images"
    );
    std::fs::remove_file(&junk).unwrap();
    c.controller.controller_expand_volume(grow(&thick)).await.expect("expansion with room");
    c.controller.create_volume(another).await.expect("preallocation with room");
    assert_eq!(leftovers(&data_dir), Vec::<String>::new());
    assert_eq!(std::fs::read(target.join("data")).unwrap(), data, "the volume's data is intact");
}
