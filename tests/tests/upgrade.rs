//! Upgrades never lose volumes: records of plinth 0.1 (schema 1) load, and a volume formatted
//! before plinth fixed its loop devices at 4096-byte logical blocks (ext4 with 1 KiB blocks on a
//! 512-byte device) still mounts, with its data.

use std::path::Path;
use std::process::Command;

use plinth_engine::sys::loopdev;
use plinth_tests::*;

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Formats `image` the way plinth 0.1 could have (1 KiB ext4 blocks on a 512-byte device) and
/// writes `text` into hello.txt on it.
fn format_as_plinth_0_1_did(image: &Path, scratch: &Path, text: &str) {
    let device = loopdev::attach_with_block_size(image, false, 512).unwrap();
    let path = device.path().display().to_string();
    run("mkfs.ext4", &["-q", "-b", "1024", "-E", "nodiscard", &path]);
    std::fs::create_dir_all(scratch).unwrap();
    run("mount", &[&path, scratch.to_str().unwrap()]);
    std::fs::write(scratch.join("hello.txt"), text).unwrap();
    run("umount", &[scratch.to_str().unwrap()]);
    loopdev::detach(device).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn a_volume_formatted_before_the_4096_geometry_still_mounts_with_its_data() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut clients = plinth.clients().await;
    let created =
        clients.controller.create_volume(create_request("legacy", 64 * MIB, mount_cap("ext4"))).await.unwrap();
    let id = created.into_inner().volume.unwrap().volume_id;
    assert!(plinth.stop().success());

    let image = std::fs::canonicalize(sandbox.data_dir().join("pool").join(format!("{id}.img"))).unwrap();
    format_as_plinth_0_1_did(&image, &sandbox.path().join("scratch"), "written by plinth 0.1\n");
    // The premise: such a filesystem does not mount on a 4096-byte device.
    let device = loopdev::attach(&image, false).unwrap();
    let refused = Command::new("mount").arg(device.path()).arg(sandbox.path().join("scratch")).output().unwrap();
    loopdev::detach(device).unwrap();
    assert!(!refused.status.success(), "a 1 KiB-block ext4 must not mount at 4096 (else this test proves nothing)");

    // Its record as plinth 0.1 wrote it: no schema, no geometry, formatted to full size.
    let record_path = sandbox.data_dir().join("volumes").join(format!("{id}.json"));
    let mut record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    let object = record.as_object_mut().unwrap();
    object.remove("schema");
    object.remove("loop_block_size");
    object.insert("filesystem_bytes".into(), (64 * MIB).into());
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();

    let plinth = Plinth::start(&sandbox, &[]);
    let mut clients = plinth.clients().await;
    let staging = sandbox.root().join("staging");
    let target = sandbox.root().join("target");
    clients.node.node_stage_volume(stage_request(&id, &staging, mount_cap("ext4"))).await.expect("stage");
    clients
        .node
        .node_publish_volume(publish_request(&id, &staging, &target, mount_cap("ext4")))
        .await
        .expect("publish");
    assert_eq!(std::fs::read_to_string(target.join("hello.txt")).unwrap(), "written by plinth 0.1\n");
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    assert_eq!(saved["schema"], 2);
    assert_eq!(saved["loop_block_size"], 512, "the geometry is recorded for every later stage");
    let device = loop_devices_under(sandbox.path()).pop().unwrap();
    let logical = std::fs::read_to_string(format!(
        "/sys/block/{}/queue/logical_block_size",
        device.file_name().unwrap().to_string_lossy()
    ))
    .unwrap();
    assert_eq!(logical.trim(), "512");
    clients
        .node
        .node_unpublish_volume(plinth_proto::csi_v1::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    clients
        .node
        .node_unstage_volume(plinth_proto::csi_v1::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    assert!(loop_devices_under(sandbox.path()).is_empty());
}
