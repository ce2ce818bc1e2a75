//! Hostile input, table-driven: hundreds of malformed or malicious requests across every RPC —
//! IDs with `/`, `..`, NUL and look-alike characters, paths outside the roots or through symlinks,
//! absurd sizes, option injection — each answered with the right gRPC code while the process keeps
//! serving and nothing on disk changes. Then the races and floods: a target swapped for a symlink
//! after validation, secrets in every request at trace logging, an oversized request, thousands
//! of concurrent streams and connections that never speak.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plinth_proto::csi_v1::{self as csi, volume_capability::access_mode::Mode};
use plinth_tests::*;
use tonic::Code;

type Outcome = Result<(), tonic::Status>;

fn code(outcome: Outcome) -> Code {
    match outcome {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// IDs no plinth ever issued, from path tricks to look-alikes (all but the first non-empty).
fn hostile_ids() -> Vec<String> {
    vec![
        String::new(),
        "/".into(),
        "..".into(),
        "../../../../etc/passwd".into(),
        "vol-../../x".into(),
        "vol-0123456789abcdef0123456789abcde\0".into(),
        "vol-0123456789abcdef\x00123456789abcdef".into(),
        // Cyrillic "о" in "vol".
        "v\u{43e}l-0123456789abcdef0123456789abcdef".into(),
        "vol-0123456789ABCDEF0123456789ABCDEF".into(),
        "vol-0123456789abcdef0123456789abcde".into(),
        "%2e%2e%2fetc".into(),
        " vol-0123456789abcdef0123456789abcdef".into(),
        "vol-0123456789abcdef0123456789abcdef/../../etc".into(),
        "x".repeat(10_000),
    ]
}

struct Fixture {
    sandbox: Sandbox,
    plinth: Plinth,
    clients: Clients,
    fs_id: String,
    staging: PathBuf,
    target: PathBuf,
    outside: tempfile::TempDir,
}

impl Fixture {
    async fn new(extra_env: &[(&str, &str)]) -> Self {
        let sandbox = Sandbox::new();
        let plinth = Plinth::start_with_env(
            &sandbox.socket(),
            &sandbox.root(),
            "standalone",
            &sandbox.data_dir(),
            &[],
            true,
            extra_env,
        );
        let mut clients = plinth.clients().await;
        let created = clients.controller.create_volume(create_request("fs", 16 * MIB, mount_cap("ext4"))).await;
        let fs_id = created.unwrap().into_inner().volume.unwrap().volume_id;
        clients.controller.create_volume(create_request("blk", 16 * MIB, block_cap())).await.unwrap();
        let staging = sandbox.root().join("staging");
        let target = sandbox.root().join("target");
        clients.node.node_stage_volume(stage_request(&fs_id, &staging, mount_cap("ext4"))).await.unwrap();
        clients.node.node_publish_volume(publish_request(&fs_id, &staging, &target, mount_cap("ext4"))).await.unwrap();
        std::fs::write(target.join("data"), b"precious").unwrap();
        let snapshot =
            csi::CreateSnapshotRequest { name: "snap".into(), source_volume_id: fs_id.clone(), ..Default::default() };
        clients.controller.create_snapshot(snapshot).await.unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), sandbox.root().join("link-out")).unwrap();
        std::os::unix::fs::symlink("/etc", sandbox.root().join("link-etc")).unwrap();
        std::os::unix::fs::symlink("/", sandbox.root().join("link-root")).unwrap();
        Self { sandbox, plinth, clients, fs_id, staging, target, outside }
    }

    /// Paths a CO must never get plinth to mount on or unmount.
    fn hostile_paths(&self) -> Vec<String> {
        let root = self.sandbox.root().display().to_string();
        vec![
            String::new(),
            "relative/path".into(),
            "/".into(),
            "/etc".into(),
            format!("{root}/../escape"),
            format!("{root}/./x"),
            format!("{root}//x"),
            format!("{root}/x/"),
            root.clone(),
            format!("{root}/link-etc"),
            format!("{root}/link-root/tmp/x"),
            format!("{root}/link-out/x"),
            format!("{root}/x\0y"),
            format!("{root}/{}", "a".repeat(5000)),
            "/proc/self/fd/0".into(),
            format!("{root}/sub/../x"),
        ]
    }

    /// Everything a request could change: files and their contents in the data dir and the
    /// allowed root, mounts and loop devices below the sandbox, the outside directory.
    fn disk_state(&self) -> String {
        let mut state = BTreeMap::new();
        let mut walk = vec![self.sandbox.data_dir(), self.sandbox.root(), self.outside.path().to_owned()];
        while let Some(dir) = walk.pop() {
            if mounts_under(self.sandbox.path()).contains(&dir) && dir != self.sandbox.root() {
                state.insert(dir.display().to_string(), "mount point".to_owned());
                continue;
            }
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    walk.push(path);
                } else if path.extension().is_some_and(|e| e == "img") {
                    state.insert(path.display().to_string(), format!("image {}", meta.len()));
                } else if meta.is_file() {
                    state.insert(
                        path.display().to_string(),
                        String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned(),
                    );
                } else {
                    state.insert(path.display().to_string(), format!("{:?}", meta.file_type()));
                }
            }
        }
        format!(
            "{state:#?}\nmounts {:?}\nloops {:?}",
            mounts_under(self.sandbox.path()),
            loop_devices_under(self.sandbox.path())
        )
    }
}

fn cap_with(flags: &[&str]) -> csi::VolumeCapability {
    mount_cap_with("ext4", flags, Mode::SingleNodeWriter)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn hundreds_of_hostile_requests_get_the_right_code_and_change_nothing() {
    require_root!();
    let mut f = Fixture::new(&[]).await;
    let before = f.disk_state();
    let mut clients = f.clients.clone();
    let c = &mut clients;
    let mut cases: Vec<(String, Code, Code)> = Vec::new();
    let mut check = |what: String, expected: Code, got: Code| cases.push((what, expected, got));

    for id in hostile_ids() {
        let shown: String = id.chars().take(40).collect();
        let empty = id.is_empty();
        let missing = if empty { Code::InvalidArgument } else { Code::NotFound };
        let gone = if empty { Code::InvalidArgument } else { Code::Ok };
        let range = Some(csi::CapacityRange { required_bytes: 32 * MIB, limit_bytes: 0 });
        let got = code(
            c.controller
                .delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })
                .await
                .map(drop),
        );
        check(format!("DeleteVolume {shown:?}"), gone, got);
        let got = code(
            c.controller
                .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id.clone() })
                .await
                .map(drop),
        );
        check(format!("ControllerGetVolume {shown:?}"), missing, got);
        let request = csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![mount_cap("ext4")],
            ..Default::default()
        };
        check(
            format!("ValidateVolumeCapabilities {shown:?}"),
            missing,
            code(c.controller.validate_volume_capabilities(request).await.map(drop)),
        );
        let request =
            csi::ControllerExpandVolumeRequest { volume_id: id.clone(), capacity_range: range, ..Default::default() };
        check(
            format!("ControllerExpandVolume {shown:?}"),
            missing,
            code(c.controller.controller_expand_volume(request).await.map(drop)),
        );
        let request = csi::ControllerModifyVolumeRequest {
            volume_id: id.clone(),
            mutable_parameters: [("provisioning".into(), "thick".into())].into(),
            ..Default::default()
        };
        check(
            format!("ControllerModifyVolume {shown:?}"),
            missing,
            code(c.controller.controller_modify_volume(request).await.map(drop)),
        );
        let request =
            csi::CreateSnapshotRequest { name: "hostile".into(), source_volume_id: id.clone(), ..Default::default() };
        check(
            format!("CreateSnapshot from {shown:?}"),
            missing,
            code(c.controller.create_snapshot(request).await.map(drop)),
        );
        let request = csi::DeleteSnapshotRequest { snapshot_id: id.clone(), ..Default::default() };
        check(format!("DeleteSnapshot {shown:?}"), gone, code(c.controller.delete_snapshot(request).await.map(drop)));
        let request = csi::GetSnapshotRequest { snapshot_id: id.clone(), ..Default::default() };
        check(format!("GetSnapshot {shown:?}"), missing, code(c.controller.get_snapshot(request).await.map(drop)));
        let staging = f.sandbox.root().join("hostile-staging");
        let target = f.sandbox.root().join("hostile-target");
        check(
            format!("NodeStageVolume {shown:?}"),
            missing,
            code(c.node.node_stage_volume(stage_request(&id, &staging, mount_cap("ext4"))).await.map(drop)),
        );
        check(
            format!("NodePublishVolume {shown:?}"),
            missing,
            code(
                c.node
                    .node_publish_volume(publish_request(&id, &f.staging, &target, mount_cap("ext4")))
                    .await
                    .map(drop),
            ),
        );
        let request =
            csi::NodeUnpublishVolumeRequest { volume_id: id.clone(), target_path: f.target.display().to_string() };
        check(
            format!("NodeUnpublishVolume {shown:?}"),
            missing,
            code(c.node.node_unpublish_volume(request).await.map(drop)),
        );
        let request = csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: f.staging.display().to_string(),
        };
        check(
            format!("NodeUnstageVolume {shown:?}"),
            missing,
            code(c.node.node_unstage_volume(request).await.map(drop)),
        );
        let request = csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: f.target.display().to_string(),
            ..Default::default()
        };
        check(
            format!("NodeGetVolumeStats {shown:?}"),
            missing,
            code(c.node.node_get_volume_stats(request).await.map(drop)),
        );
        let request = csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: f.staging.display().to_string(),
            ..Default::default()
        };
        check(format!("NodeExpandVolume {shown:?}"), missing, code(c.node.node_expand_volume(request).await.map(drop)));
    }

    let fs_id = f.fs_id.clone();
    for path in f.hostile_paths() {
        let shown: String = path.chars().take(60).collect();
        let stats_code = if path.is_empty() { Code::InvalidArgument } else { Code::NotFound };
        let p = Path::new(&path);
        check(
            format!("NodeStageVolume at {shown:?}"),
            Code::InvalidArgument,
            code(c.node.node_stage_volume(stage_request(&fs_id, p, mount_cap("ext4"))).await.map(drop)),
        );
        check(
            format!("NodePublishVolume at {shown:?}"),
            Code::InvalidArgument,
            code(c.node.node_publish_volume(publish_request(&fs_id, &f.staging, p, mount_cap("ext4"))).await.map(drop)),
        );
        check(
            format!("NodePublishVolume from staging {shown:?}"),
            Code::InvalidArgument,
            code(
                c.node
                    .node_publish_volume(publish_request(&fs_id, p, &f.sandbox.root().join("t2"), mount_cap("ext4")))
                    .await
                    .map(drop),
            ),
        );
        let request = csi::NodeUnpublishVolumeRequest { volume_id: fs_id.clone(), target_path: path.clone() };
        check(
            format!("NodeUnpublishVolume at {shown:?}"),
            Code::InvalidArgument,
            code(c.node.node_unpublish_volume(request).await.map(drop)),
        );
        let request = csi::NodeUnstageVolumeRequest { volume_id: fs_id.clone(), staging_target_path: path.clone() };
        check(
            format!("NodeUnstageVolume at {shown:?}"),
            Code::InvalidArgument,
            code(c.node.node_unstage_volume(request).await.map(drop)),
        );
        let request = csi::NodeGetVolumeStatsRequest {
            volume_id: fs_id.clone(),
            volume_path: path.clone(),
            ..Default::default()
        };
        check(
            format!("NodeGetVolumeStats at {shown:?}"),
            stats_code,
            code(c.node.node_get_volume_stats(request).await.map(drop)),
        );
    }

    for flag in [
        "suid",
        "dev",
        "rw,suid",
        "nosuid,dev",
        "errors=panic",
        "x-mount.mkdir",
        "bind",
        "remount",
        "a,,b",
        "defaults\0suid",
        "context=system_u:object_r:tmp_t",
        "nouuid",
        "data=journal,errors=panic",
        "uid=0",
        "loop",
        "move",
        "rbind",
    ] {
        let staging = f.sandbox.root().join("opt-staging");
        check(
            format!("NodeStageVolume with mount option {flag:?}"),
            Code::InvalidArgument,
            code(c.node.node_stage_volume(stage_request(&fs_id, &staging, cap_with(&[flag]))).await.map(drop)),
        );
        let target = f.sandbox.root().join("opt-target");
        check(
            format!("NodePublishVolume with mount option {flag:?}"),
            Code::InvalidArgument,
            code(
                c.node
                    .node_publish_volume(publish_request(&fs_id, &f.staging, &target, cap_with(&[flag])))
                    .await
                    .map(drop),
            ),
        );
    }

    for options in [
        "-f",
        "--force",
        "-F",
        "/dev/sda",
        "-E discard",
        "-K",
        "-L a b",
        "-L $(reboot)",
        "-b 4096 /dev/sda",
        "-O ^has_journal -f",
        "; rm -rf /",
        "-q",
        "-N 99999999999999",
        "-T huge",
        "-b 4096 -b",
    ] {
        let mut request = create_request("mkfs-injection", 16 * MIB, mount_cap("ext4"));
        request.parameters.insert("mkfsOptions".into(), options.into());
        check(
            format!("CreateVolume with mkfsOptions {options:?}"),
            Code::InvalidArgument,
            code(c.controller.create_volume(request).await.map(drop)),
        );
    }
    for (key, value) in [
        ("fsType", "../../bin/sh"),
        ("provisioning", "thin\0"),
        ("unknownKey", "x"),
        ("csi.storage.k8s.io/fstype", "ntfs"),
        ("fsType", "ext4; reboot"),
    ] {
        let mut request = create_request("param-injection", 16 * MIB, mount_cap(""));
        request.parameters.insert(key.into(), value.into());
        check(
            format!("CreateVolume with {key}={value:?}"),
            Code::InvalidArgument,
            code(c.controller.create_volume(request).await.map(drop)),
        );
    }
    for (required, limit, expected) in [
        (-1, 0, Code::InvalidArgument),
        (0, -1, Code::InvalidArgument),
        (i64::MIN, 0, Code::InvalidArgument),
        // Larger than any pool: not here.
        (i64::MAX / 2, 0, Code::ResourceExhausted),
        // Not a size plinth supports at all (it rounds to MiB, which would overflow).
        (i64::MAX, 0, Code::OutOfRange),
        (i64::MAX, i64::MAX, Code::OutOfRange),
        (10 * MIB, 5 * MIB, Code::OutOfRange),
        (1, 1, Code::OutOfRange),
    ] {
        let mut request = create_request("absurd", 0, mount_cap("ext4"));
        request.capacity_range = Some(csi::CapacityRange { required_bytes: required, limit_bytes: limit });
        check(
            format!("CreateVolume sized ({required}, {limit})"),
            expected,
            code(c.controller.create_volume(request).await.map(drop)),
        );
    }
    for (required, limit, expected) in [
        (-5, 0, Code::InvalidArgument),
        (0, -5, Code::InvalidArgument),
        (MIB, 2 * MIB, Code::OutOfRange),
        (i64::MAX / 2, 0, Code::ResourceExhausted),
        (i64::MAX, 0, Code::OutOfRange),
    ] {
        let request = csi::ControllerExpandVolumeRequest {
            volume_id: fs_id.clone(),
            capacity_range: Some(csi::CapacityRange { required_bytes: required, limit_bytes: limit }),
            ..Default::default()
        };
        check(
            format!("ControllerExpandVolume to ({required}, {limit})"),
            expected,
            code(c.controller.controller_expand_volume(request).await.map(drop)),
        );
    }
    for token in
        ["-1", "abc", "999999999999999999999", "vol-zzzz", "vol-0000000000000000000000000000000g", "../../etc", "\0"]
    {
        let request = csi::ListVolumesRequest { starting_token: token.into(), max_entries: 1 };
        check(
            format!("ListVolumes after {token:?}"),
            Code::Aborted,
            code(c.controller.list_volumes(request).await.map(drop)),
        );
        let request = csi::ListSnapshotsRequest { starting_token: token.into(), ..Default::default() };
        check(
            format!("ListSnapshots after {token:?}"),
            Code::Aborted,
            code(c.controller.list_snapshots(request).await.map(drop)),
        );
    }
    check(
        "ListVolumes max -1".into(),
        Code::InvalidArgument,
        code(
            c.controller
                .list_volumes(csi::ListVolumesRequest { max_entries: -1, ..Default::default() })
                .await
                .map(drop),
        ),
    );

    let wrong: Vec<String> = cases
        .iter()
        .filter(|(_, expected, got)| expected != got)
        .map(|(what, expected, got)| format!("{what}: expected {expected:?}, got {got:?}"))
        .collect();
    assert!(wrong.is_empty(), "{} of {} cases answered wrongly:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
    assert!(cases.len() >= 200, "only {} cases", cases.len());
    eprintln!("{} hostile requests, each with the right code", cases.len());

    let info = f.clients.identity.get_plugin_info(csi::GetPluginInfoRequest {}).await;
    assert!(info.is_ok(), "still serving");
    assert_eq!(f.disk_state(), before, "nothing on disk changed");
    assert_eq!(std::fs::read(f.target.join("data")).unwrap(), b"precious");
    let log = std::fs::read_to_string(&f.plinth.log).unwrap();
    assert!(!log.contains("panicked"), "no panic: {log}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn a_target_swapped_for_a_symlink_after_validation_never_receives_the_mount() {
    require_root!();
    for (point, expect_ok) in [("publish.target_ready", false), ("publish.pinned", true)] {
        let f = Fixture::new(&[("PLINTH_FAILPOINT", &format!("{point}=sleep:1500"))]).await;
        let target = f.sandbox.root().join("swapped");
        let request = publish_request(&f.fs_id, &f.staging, &target, mount_cap("ext4"));
        let mut node = f.clients.node.clone();
        let call = tokio::spawn(async move { node.node_publish_volume(request).await });
        // While plinth holds still between its checks and its mount: the target becomes a
        // symlink to a directory outside the allowed roots.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !target.exists() {
            assert!(Instant::now() < deadline, "{point}: the target never appeared");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::rename(&target, f.sandbox.root().join("moved-away")).unwrap();
        std::os::unix::fs::symlink(f.outside.path(), &target).unwrap();
        let outcome = call.await.unwrap();
        let outside_mounted = mounts_under(f.outside.path());
        assert!(outside_mounted.is_empty(), "{point}: nothing is mounted outside the roots: {outside_mounted:?}");
        assert!(std::fs::read_dir(f.outside.path()).unwrap().next().is_none(), "{point}: the outside dir is untouched");
        match (expect_ok, outcome) {
            // Swapped before the pin: the pin refuses the symlink.
            (false, Err(status)) => assert_eq!(status.code(), Code::InvalidArgument, "{point}: {status:?}"),
            // Swapped after the pin: the mount lands on the pinned directory, wherever it went.
            (true, Ok(_)) => {
                let moved = f.sandbox.root().join("moved-away");
                assert!(mounts_under(f.sandbox.path()).contains(&moved), "{point}: mounted on the checked directory");
                assert_eq!(std::fs::read(moved.join("data")).unwrap(), b"precious");
                nix::mount::umount2(&moved, nix::mount::MntFlags::MNT_DETACH).unwrap();
            }
            (_, other) => panic!("{point}: unexpected {other:?}"),
        }
        drop(f.clients);
        assert!(f.plinth.stop().success());
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn secrets_never_reach_the_log_even_at_trace_level() {
    require_root!();
    const SECRET: &str = "s3cr3t-value-never-logged";
    let f = Fixture::new(&[("PLINTH_LOG", "trace")]).await;
    let secrets = || [("password".to_owned(), SECRET.to_owned()), ("key".to_owned(), SECRET.to_owned())].into();
    let mut clients = f.clients.clone();
    let c = &mut clients;
    let mut create = create_request("with-secrets", 16 * MIB, mount_cap("ext4"));
    create.secrets = secrets();
    c.controller.create_volume(create.clone()).await.unwrap();
    let mut bad = create.clone();
    bad.parameters.insert("color".into(), "blue".into());
    assert!(c.controller.create_volume(bad).await.is_err(), "a refused request logs its error, not its secrets");
    let id = plinth_engine::VolumeId::for_name("with-secrets").to_string();
    let staging = f.sandbox.root().join("secret-staging");
    let target = f.sandbox.root().join("secret-target");
    let mut stage = stage_request(&id, &staging, mount_cap("ext4"));
    stage.secrets = secrets();
    c.node.node_stage_volume(stage).await.unwrap();
    let mut publish = publish_request(&id, &staging, &target, mount_cap("ext4"));
    publish.secrets = secrets();
    c.node.node_publish_volume(publish).await.unwrap();
    let expand = csi::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 32 * MIB, limit_bytes: 0 }),
        secrets: secrets(),
        ..Default::default()
    };
    c.controller.controller_expand_volume(expand).await.unwrap();
    let snapshot = csi::CreateSnapshotRequest {
        name: "secret-snap".into(),
        source_volume_id: id.clone(),
        secrets: secrets(),
        ..Default::default()
    };
    c.controller.create_snapshot(snapshot).await.unwrap();
    let list = csi::ListSnapshotsRequest { secrets: secrets(), ..Default::default() };
    c.controller.list_snapshots(list).await.unwrap();
    let delete = csi::DeleteVolumeRequest { volume_id: id.clone(), secrets: secrets() };
    assert!(c.controller.delete_volume(delete).await.is_err(), "refused: still published");
    let log = std::fs::read_to_string(&f.plinth.log).unwrap();
    assert!(log.lines().count() > 50, "trace logging is on: {} lines", log.lines().count());
    assert!(!log.contains(SECRET), "a secret reached the log");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn oversized_requests_stream_floods_and_silent_connections_stay_harmless() {
    require_root!();
    let f = Fixture::new(&[]).await;
    let socket = f.sandbox.socket();
    let mut c = f.clients.clone();

    // A 16 MiB request: refused by the 4 MiB message limit, the server carries on.
    let mut huge = create_request("huge", 16 * MIB, mount_cap("ext4"));
    huge.parameters.insert("blob".into(), "x".repeat(16 << 20));
    let status = c.controller.create_volume(huge).await.unwrap_err();
    assert!(matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange), "{status:?}");

    // 500 connections that never send a byte (not even the HTTP/2 preface), held open.
    let mut silent = Vec::new();
    for _ in 0..500 {
        silent.push(std::os::unix::net::UnixStream::connect(&socket).unwrap());
    }
    // 3000 concurrent streams on one connection.
    let started = Instant::now();
    let calls: Vec<_> = (0..3000)
        .map(|_| {
            let mut identity = c.identity.clone();
            tokio::spawn(async move { identity.get_plugin_info(csi::GetPluginInfoRequest {}).await.map(drop) })
        })
        .collect();
    for call in calls {
        call.await.unwrap().expect("every stream is answered");
    }
    eprintln!("3000 concurrent streams answered in {:.2?} with 500 silent connections open", started.elapsed());
    // A fresh client still gets answers quickly.
    let started = Instant::now();
    let mut fresh = Clients::connect(&socket).await;
    fresh.identity.probe(csi::ProbeRequest {}).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "answered in {:?}", started.elapsed());
    drop(silent);
    let log = std::fs::read_to_string(&f.plinth.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}
