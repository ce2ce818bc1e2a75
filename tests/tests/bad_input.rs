//! Every documented bad input gets a clear gRPC code, never a panic, and leaves nothing behind.

use plinth_proto::csi_v1::{self as csi, volume_capability::access_mode::Mode};
use plinth_tests::*;
use tonic::Code;

fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => {
            assert!(!status.message().is_empty(), "errors explain themselves: {status:?}");
            status.code()
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn controller_rejects_bad_requests_with_the_right_codes() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut c = plinth.clients().await;

    let base = || create_request("bad", 16 * MIB, mount_cap("ext4"));
    let with = |edit: fn(&mut csi::CreateVolumeRequest)| {
        let mut r = base();
        edit(&mut r);
        r
    };
    let cases: Vec<(&str, csi::CreateVolumeRequest, Code)> = vec![
        ("empty name", with(|r| r.name.clear()), Code::InvalidArgument),
        ("no capabilities", with(|r| r.volume_capabilities.clear()), Code::InvalidArgument),
        (
            "multi-node mode",
            with(|r| r.volume_capabilities = vec![mount_cap_with("ext4", &[], Mode::MultiNodeMultiWriter)]),
            Code::InvalidArgument,
        ),
        (
            "unknown mode",
            with(|r| r.volume_capabilities = vec![mount_cap_with("ext4", &[], Mode::Unknown)]),
            Code::InvalidArgument,
        ),
        ("no access type", with(|r| r.volume_capabilities[0].access_type = None), Code::InvalidArgument),
        ("unknown fs", with(|r| r.volume_capabilities = vec![mount_cap("ntfs")]), Code::InvalidArgument),
        (
            "unknown parameter",
            with(|r| {
                r.parameters.insert("color".into(), "blue".into());
            }),
            Code::InvalidArgument,
        ),
        (
            "bad provisioning",
            with(|r| {
                r.parameters.insert("provisioning".into(), "fat".into());
            }),
            Code::InvalidArgument,
        ),
        (
            "fs conflict",
            with(|r| {
                r.parameters.insert("fsType".into(), "xfs".into());
            }),
            Code::InvalidArgument,
        ),
        (
            "negative size",
            with(|r| r.capacity_range = Some(csi::CapacityRange { required_bytes: -1, limit_bytes: 0 })),
            Code::InvalidArgument,
        ),
        (
            "limit below required",
            with(|r| r.capacity_range = Some(csi::CapacityRange { required_bytes: 10 * MIB, limit_bytes: 5 * MIB })),
            Code::OutOfRange,
        ),
        (
            "xfs under its minimum",
            with(|r| {
                r.volume_capabilities = vec![mount_cap("xfs")];
                r.capacity_range = Some(csi::CapacityRange { required_bytes: MIB, limit_bytes: 100 * MIB });
            }),
            Code::OutOfRange,
        ),
        (
            "larger than the pool",
            with(|r| r.capacity_range = Some(csi::CapacityRange { required_bytes: i64::MAX / 2, limit_bytes: 0 })),
            Code::ResourceExhausted,
        ),
        (
            "wrong node",
            with(|r| {
                r.accessibility_requirements = Some(csi::TopologyRequirement {
                    requisite: vec![csi::Topology {
                        segments: [(plinth_proto::TOPOLOGY_NODE_KEY.into(), "elsewhere".into())].into(),
                    }],
                    preferred: vec![],
                })
            }),
            Code::ResourceExhausted,
        ),
        (
            "content source",
            with(|r| r.volume_content_source = Some(csi::VolumeContentSource::default())),
            Code::InvalidArgument,
        ),
    ];
    for (what, request, expected) in cases {
        assert_eq!(code(c.controller.create_volume(request).await), expected, "CreateVolume: {what}");
    }
    assert!(sandbox.pool_images().is_empty(), "refused creates leave no image: {:?}", sandbox.pool_images());

    // xfs below its minimum rounds up when the limit allows it.
    let mut small_xfs = create_request("small-xfs", MIB, mount_cap("xfs"));
    small_xfs.capacity_range = Some(csi::CapacityRange { required_bytes: MIB, limit_bytes: 0 });
    let volume = c.controller.create_volume(small_xfs).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(volume.capacity_bytes, 300 * MIB);

    c.controller.create_volume(base()).await.expect("valid create");
    c.controller.create_volume(base()).await.expect("same request again is the same volume");
    let bigger = with(|r| r.capacity_range = Some(csi::CapacityRange { required_bytes: 32 * MIB, limit_bytes: 0 }));
    assert_eq!(code(c.controller.create_volume(bigger).await), Code::AlreadyExists);
    let as_block = with(|r| r.volume_capabilities = vec![block_cap()]);
    assert_eq!(code(c.controller.create_volume(as_block).await), Code::AlreadyExists);

    let list = |token: &str, max: i32| csi::ListVolumesRequest { starting_token: token.into(), max_entries: max };
    assert_eq!(code(c.controller.list_volumes(list("-1", 0)).await), Code::Aborted);
    assert_eq!(code(c.controller.list_volumes(list("../../etc", 0)).await), Code::Aborted);
    assert_eq!(code(c.controller.list_volumes(list("", -1)).await), Code::InvalidArgument);
    let page = c.controller.list_volumes(list("", 1)).await.unwrap().into_inner();
    assert_eq!(page.entries.len(), 1);
    let rest = c.controller.list_volumes(list(&page.next_token, 1)).await.unwrap().into_inner();
    assert_eq!(rest.entries.len(), 1);
    assert!(rest.next_token.is_empty(), "two volumes, two pages");
    assert_ne!(page.entries[0].volume.as_ref().unwrap().volume_id, rest.entries[0].volume.as_ref().unwrap().volume_id);

    let delete = |id: &str| csi::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };
    assert_eq!(code(c.controller.delete_volume(delete("")).await), Code::InvalidArgument);
    assert_eq!(
        code(c.controller.delete_volume(delete("../../../etc/passwd")).await),
        Code::Ok,
        "unknown id: already gone"
    );
    assert_eq!(code(c.controller.delete_volume(delete("vol-00000000000000000000000000000000")).await), Code::Ok);

    let validate = |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    assert_eq!(
        code(c.controller.validate_volume_capabilities(validate("", vec![mount_cap("")])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.controller.validate_volume_capabilities(validate("nope", vec![mount_cap("")])).await),
        Code::NotFound
    );
    let multi = c
        .controller
        .validate_volume_capabilities(validate(
            &volume.volume_id,
            vec![mount_cap_with("", &[], Mode::MultiNodeMultiWriter)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(multi.confirmed.is_none() && multi.message.contains("MULTI_NODE"), "{multi:?}");
    let snap = |name: &str, source: &str, params: &[(&str, &str)]| csi::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let cases = [
        ("no name", snap("", &volume.volume_id, &[]), Code::InvalidArgument),
        ("no source", snap("s", "", &[]), Code::InvalidArgument),
        ("unknown source", snap("s", "vol-0123456789abcdef0123456789abcdef", &[]), Code::NotFound),
        ("path-like source", snap("s", "../../etc", &[]), Code::NotFound),
        ("unknown parameter", snap("s", &volume.volume_id, &[("speed", "fast")]), Code::InvalidArgument),
    ];
    for (what, request, expected) in cases {
        assert_eq!(code(c.controller.create_snapshot(request).await), expected, "CreateSnapshot: {what}");
    }
    let k8s = snap("s", &volume.volume_id, &[("csi.storage.k8s.io/volumesnapshot/name", "x")]);
    assert_eq!(code(c.controller.create_snapshot(k8s).await), Code::Ok);
    let listed = c.controller.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    let other =
        listed.entries.iter().map(|e| e.volume.as_ref().unwrap().volume_id.clone()).find(|id| *id != volume.volume_id);
    let other_source = snap("s", &other.expect("two volumes exist"), &[]);
    assert_eq!(code(c.controller.create_snapshot(other_source).await), Code::AlreadyExists, "same name, other source");
    let list = |token: &str| csi::ListSnapshotsRequest { starting_token: token.into(), ..Default::default() };
    assert_eq!(code(c.controller.list_snapshots(list("bogus")).await), Code::Aborted);
    let get = csi::GetSnapshotRequest { snapshot_id: "snap-missing".into(), ..Default::default() };
    assert_eq!(code(c.controller.get_snapshot(get).await), Code::NotFound);
    let expand = csi::ControllerExpandVolumeRequest { volume_id: volume.volume_id.clone(), ..Default::default() };
    assert_eq!(code(c.controller.controller_expand_volume(expand).await), Code::InvalidArgument, "no range");
    assert!(plinth.stop().success(), "plinth survived every bad request and exits cleanly");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn node_rejects_bad_paths_ids_and_options_without_side_effects() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut c = plinth.clients().await;
    let fs_volume = c.controller.create_volume(create_request("fs", 16 * MIB, mount_cap("ext4"))).await.unwrap();
    let fs_id = fs_volume.into_inner().volume.unwrap().volume_id;
    let block_volume = c.controller.create_volume(create_request("blk", 16 * MIB, block_cap())).await.unwrap();
    let block_id = block_volume.into_inner().volume.unwrap().volume_id;
    let root = sandbox.root();
    let staging = root.join("staging");
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("target-link")).unwrap();

    let stage = |id: &str, path: String, cap: Option<csi::VolumeCapability>| csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path,
        volume_capability: cap,
        ..Default::default()
    };
    let s = |p: &std::path::Path| p.display().to_string();
    let cases: Vec<(&str, csi::NodeStageVolumeRequest, Code)> = vec![
        ("no id", stage("", s(&staging), Some(mount_cap("ext4"))), Code::InvalidArgument),
        ("no path", stage(&fs_id, String::new(), Some(mount_cap("ext4"))), Code::InvalidArgument),
        // csi-sanity's IDs are not plinth's shape: a missing field still comes first.
        ("no path, foreign id", stage("fake-volume-id", String::new(), Some(mount_cap("ext4"))), Code::InvalidArgument),
        ("no capability, foreign id", stage("fake-volume-id", s(&staging), None), Code::InvalidArgument),
        ("no capability", stage(&fs_id, s(&staging), None), Code::InvalidArgument),
        ("relative path", stage(&fs_id, "relative/staging".into(), Some(mount_cap("ext4"))), Code::InvalidArgument),
        ("dot-dot", stage(&fs_id, format!("{}/../escape", s(&root)), Some(mount_cap("ext4"))), Code::InvalidArgument),
        ("outside roots", stage(&fs_id, s(&outside.path().join("s")), Some(mount_cap("ext4"))), Code::InvalidArgument),
        ("through a symlink", stage(&fs_id, s(&root.join("link/s")), Some(mount_cap("ext4"))), Code::InvalidArgument),
        (
            "unknown volume",
            stage("vol-0123456789abcdef0123456789abcdef", s(&staging), Some(mount_cap("ext4"))),
            Code::NotFound,
        ),
        ("path-like id", stage("../../../../etc", s(&staging), Some(mount_cap("ext4"))), Code::NotFound),
        (
            "escalating option",
            stage(&fs_id, s(&staging), Some(mount_cap_with("ext4", &["suid"], Mode::SingleNodeWriter))),
            Code::InvalidArgument,
        ),
        (
            "panic option",
            stage(&fs_id, s(&staging), Some(mount_cap_with("ext4", &["errors=panic"], Mode::SingleNodeWriter))),
            Code::InvalidArgument,
        ),
        ("wrong filesystem", stage(&fs_id, s(&staging), Some(mount_cap("xfs"))), Code::InvalidArgument),
        ("block volume as filesystem", stage(&block_id, s(&staging), Some(mount_cap("ext4"))), Code::InvalidArgument),
    ];
    for (what, request, expected) in cases {
        assert_eq!(code(c.node.node_stage_volume(request).await), expected, "NodeStageVolume: {what}");
        assert!(loop_devices_under(sandbox.path()).is_empty(), "{what}: no loop device left");
        assert!(mounts_under(sandbox.path()).is_empty(), "{what}: no mount left");
    }
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none(), "nothing written through the symlink");

    c.node.node_stage_volume(stage(&fs_id, s(&staging), Some(mount_cap("ext4")))).await.unwrap();
    let elsewhere = stage(&fs_id, s(&root.join("other-staging")), Some(mount_cap("ext4")));
    assert_eq!(code(c.node.node_stage_volume(elsewhere).await), Code::AlreadyExists);
    let publish = |target: String| publish_request(&fs_id, &staging, std::path::Path::new(&target), mount_cap("ext4"));
    assert_eq!(code(c.node.node_publish_volume(publish(s(&root.join("target-link")))).await), Code::InvalidArgument);
    assert_eq!(code(c.node.node_publish_volume(publish("/etc/plinth-target".into())).await), Code::InvalidArgument);
    assert_eq!(code(c.node.node_publish_volume(publish(String::new())).await), Code::InvalidArgument);
    let target = root.join("target");
    c.node.node_publish_volume(publish(s(&target))).await.unwrap();
    let mut ro_again = publish(s(&target));
    ro_again.readonly = true;
    assert_eq!(code(c.node.node_publish_volume(ro_again).await), Code::AlreadyExists, "incompatible republish");

    let stats = |id: &str, path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    assert_eq!(code(c.node.node_get_volume_stats(stats(&fs_id, "")).await), Code::InvalidArgument);
    assert_eq!(code(c.node.node_get_volume_stats(stats(&fs_id, "some/path")).await), Code::NotFound);
    assert_eq!(code(c.node.node_get_volume_stats(stats(&block_id, &s(&target))).await), Code::NotFound);
    assert_eq!(code(c.node.node_get_volume_stats(stats(&fs_id, &s(&target))).await), Code::Ok);

    let delete = csi::DeleteVolumeRequest { volume_id: fs_id.clone(), ..Default::default() };
    assert_eq!(code(c.controller.delete_volume(delete.clone()).await), Code::FailedPrecondition);
    let unstage = csi::NodeUnstageVolumeRequest { volume_id: fs_id.clone(), staging_target_path: s(&staging) };
    assert_eq!(code(c.node.node_unstage_volume(unstage.clone()).await), Code::FailedPrecondition, "still published");
    let unpublish = csi::NodeUnpublishVolumeRequest { volume_id: fs_id.clone(), target_path: s(&target) };
    c.node.node_unpublish_volume(unpublish.clone()).await.unwrap();
    c.node.node_unpublish_volume(unpublish).await.expect("unpublish is idempotent");
    c.node.node_unstage_volume(unstage.clone()).await.unwrap();
    c.node.node_unstage_volume(unstage).await.expect("unstage is idempotent");
    c.controller.delete_volume(delete.clone()).await.unwrap();
    c.controller.delete_volume(delete).await.expect("delete is idempotent");
    assert!(loop_devices_under(sandbox.path()).is_empty() && mounts_under(sandbox.path()).is_empty());
    assert!(plinth.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn existing_data_is_never_reformatted() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut c = plinth.clients().await;
    let volume = c.controller.create_volume(create_request("precious", 128 * MIB, mount_cap("ext4"))).await.unwrap();
    let id = volume.into_inner().volume.unwrap().volume_id;
    // The image already holds a different filesystem (restored by hand, say).
    let image = sandbox.data_dir().join("pool").join(format!("{id}.img"));
    let status = std::process::Command::new("mkfs.btrfs").arg("-q").arg(&image).status().unwrap();
    assert!(status.success());
    let before = std::fs::read(&image).unwrap();
    let staging = sandbox.root().join("staging");
    let err = c.node.node_stage_volume(stage_request(&id, &staging, mount_cap("ext4"))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("btrfs"), "{}", err.message());
    assert_eq!(std::fs::read(&image).unwrap(), before, "not a byte changed");
    assert!(loop_devices_under(sandbox.path()).is_empty(), "the failed stage detached its device");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn socket_is_private_and_a_stale_one_is_replaced() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    // A stale socket left by a crashed process.
    drop(std::os::unix::net::UnixListener::bind(sandbox.socket()).unwrap());
    let plinth = Plinth::start(&sandbox, &[]);
    let mode = std::fs::metadata(sandbox.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut c = plinth.clients().await;
    let info = c.identity.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "plinth.csi.dev");
    assert_eq!(c.identity.probe(csi::ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));
    assert!(plinth.stop().success());
    assert!(!sandbox.socket().exists(), "socket removed on shutdown");

    // A regular file where the socket should be is never deleted.
    std::fs::write(sandbox.socket(), b"not a socket").unwrap();
    let output = std::process::Command::new(plinth_bin())
        .args(["--endpoint", &sandbox.endpoint(), "standalone", "--data-dir"])
        .arg(sandbox.data_dir())
        .arg("--allowed-root")
        .arg(sandbox.root())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(sandbox.socket()).unwrap(), b"not a socket");
}
