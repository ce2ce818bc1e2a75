//! The node's decisions against the in-memory host: no root, no kernel. Image files and records
//! are real files in a temp dir; loop devices, mounts and filesystems are the fake's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::caps::{AccessMode, AccessType, Capability};
use crate::error::Error;
use crate::host::fake::{Call, FakeHost, Op};
use crate::model::{FsType, Layout, VolumeParameters, VolumeRecord};
use crate::sys::mkfs::Probe;
use crate::sys::mount::MsFlags;
use crate::volumes::CreateVolume;
use crate::{Engine, EngineConfig, VolumeId};

const MIB: u64 = 1 << 20;

struct Node {
    dir: tempfile::TempDir,
    host: FakeHost,
    engine: Slot,
}

/// The node's engine; empty only while it restarts (one engine per data dir at a time).
struct Slot(Option<Engine>);

impl std::ops::Deref for Slot {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        self.0.as_ref().expect("an engine")
    }
}

fn mount_cap(flags: &[&str], mode: AccessMode) -> Capability {
    Capability {
        access_type: AccessType::Mount {
            fs_type: None,
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            volume_mount_group: String::new(),
        },
        mode,
    }
}

fn fs_cap() -> Capability {
    mount_cap(&[], AccessMode::SingleNodeWriter)
}

fn block_cap() -> Capability {
    Capability { access_type: AccessType::Block, mode: AccessMode::SingleNodeWriter }
}

impl Node {
    fn new() -> Self {
        Self::with_options(&[], true)
    }

    fn with_options(allowed_mount_options: &[&str], restore_publications: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::new();
        let engine = Slot(Some(Self::open(dir.path(), &host, allowed_mount_options, restore_publications)));
        Self { dir, host, engine }
    }

    fn open(dir: &Path, host: &FakeHost, allowed: &[&str], restore_publications: bool) -> Engine {
        let config = EngineConfig {
            data_dir: dir.join("data"),
            node_id: "node-a".into(),
            allowed_roots: vec![dir.join("root")],
            default_volume_size: 64 * MIB,
            pool_capacity: None,
            allowed_mount_options: allowed.iter().map(|o| o.to_string()).collect(),
            restore_publications,
        };
        Engine::open_with_host(config, Arc::new(host.clone())).unwrap()
    }

    /// The same data dir and host, a new engine: a plinth restart.
    fn restart(&mut self) {
        self.engine.0 = None;
        self.engine.0 = Some(Self::open(self.dir.path(), &self.host, &[], true));
    }

    fn create(&self, name: &str, fs: Option<FsType>) -> VolumeRecord {
        let capability = match fs {
            Some(fs) => Capability {
                access_type: AccessType::Mount {
                    fs_type: Some(fs),
                    mount_flags: vec![],
                    volume_mount_group: String::new(),
                },
                mode: AccessMode::SingleNodeWriter,
            },
            None => block_cap(),
        };
        self.engine
            .create_volume(&CreateVolume {
                name: name.into(),
                required_bytes: 64 * MIB as i64,
                limit_bytes: 0,
                capabilities: vec![capability],
                parameters: VolumeParameters::default(),
                requisite_nodes: None,
                content_source: None,
                mutable_parameters: Default::default(),
            })
            .unwrap()
    }

    /// A volume staged once (so formatted) and unstaged again.
    fn formatted(&self, name: &str, fs: FsType) -> VolumeRecord {
        let volume = self.create(name, Some(fs));
        self.stage(&volume.id, &fs_cap()).unwrap();
        self.engine.unstage_volume(&volume.id, &self.arg("staging")).unwrap();
        volume
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join("root").join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn image(&self, id: &VolumeId) -> PathBuf {
        self.engine.pool.image_path(id)
    }

    fn record(&self, id: &VolumeId) -> VolumeRecord {
        self.engine.store.load(id).unwrap().unwrap()
    }

    fn stage(&self, id: &VolumeId, cap: &Capability) -> crate::Result<()> {
        self.engine.stage_volume(id, &self.arg("staging"), cap)
    }

    fn publish(&self, id: &VolumeId, target: &str, cap: &Capability, readonly: bool) -> crate::Result<()> {
        self.engine.publish_volume(id, &self.arg("staging"), &self.arg(target), cap, readonly)
    }

    fn count(&self, matches: impl Fn(&Call) -> bool) -> usize {
        self.host.calls().iter().filter(|c| matches(c)).count()
    }

    /// Nothing attached, nothing mounted: what every failed first stage must leave.
    fn assert_clean(&self) {
        assert!(self.host.attached().is_empty(), "left attached: {:?}", self.host.attached());
        assert!(self.host.mounts().is_empty(), "left mounted: {:?}", self.host.mount_points());
    }

    /// Makes the next record write fail.
    fn break_next_save(&self) {
        crate::failpoint::arm("store.save", 1);
    }
}

fn internal(result: crate::Result<()>) -> String {
    match result {
        Err(Error::Internal { .. }) => result.unwrap_err().chain(),
        other => panic!("expected INTERNAL, got {other:?}"),
    }
}

#[test]
fn first_stage_formats_mounts_and_records() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    let record = node.record(&volume.id);
    let staged = record.staged.as_ref().unwrap();
    assert_eq!(staged.staging_path, node.path("staging"));
    assert!(staged.filesystem_mounted);
    assert_eq!(record.filesystem_bytes, record.capacity_bytes);
    assert_eq!(node.count(|c| matches!(c, Call::MakeFilesystem { fs: FsType::Ext4, .. })), 1);
    let mount = node.host.mounts().pop().unwrap();
    assert_eq!(mount.mount_point, node.path("staging"));
    assert_eq!(mount.source, staged.device.display().to_string());
    let flags = node.host.calls().into_iter().find_map(|c| match c {
        Call::MountFilesystem { flags, .. } => Some(flags),
        _ => None,
    });
    assert!(flags.unwrap().contains(MsFlags::MS_NOSUID | MsFlags::MS_NODEV), "hardened by default");
}

#[test]
fn stage_retry_reuses_the_attachment_and_the_mount() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.host.clear_calls();
    node.stage(&volume.id, &fs_cap()).unwrap();
    assert_eq!(node.count(|c| matches!(c, Call::Attach { .. })), 0, "no second attach");
    assert_eq!(node.count(|c| matches!(c, Call::MountFilesystem { .. } | Call::MakeFilesystem { .. })), 0);
    assert_eq!(node.host.attached().len(), 1);
    assert_eq!(node.host.mounts().len(), 1);
}

#[test]
fn stage_after_a_failed_mount_reuses_the_device_it_left_attached() {
    // An attachment left by a crash (no record of it): stage finds it by backing file.
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    use crate::host::Host;
    node.host.attach_loop(&node.image(&volume.id), false, 4096).unwrap();
    node.host.clear_calls();
    node.stage(&volume.id, &fs_cap()).unwrap();
    assert_eq!(node.count(|c| matches!(c, Call::Attach { .. })), 0);
    assert_eq!(node.host.attached().len(), 1);
}

#[test]
fn stage_never_formats_over_a_foreign_signature_and_leaves_nothing() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    for (content, expected) in [
        (Probe::Other("gpt partition table".into()), "never formats over existing data"),
        (Probe::Filesystem { fs: "xfs".into(), block_size: Some(4096) }, "never reformats existing data"),
    ] {
        node.host.put_content(&node.image(&volume.id), content, 64 * MIB);
        node.host.clear_calls();
        let err = node.stage(&volume.id, &fs_cap()).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains(expected)), "{err:?}");
        assert_eq!(node.count(|c| matches!(c, Call::MakeFilesystem { .. })), 0);
        node.assert_clean();
        assert!(node.record(&volume.id).staged.is_none());
    }
}

#[test]
fn every_failing_step_of_a_first_stage_undoes_what_it_did() {
    for op in [Op::Attach, Op::LoopSize, Op::MountTable, Op::Probe, Op::MakeFilesystem, Op::MountFilesystem] {
        let node = Node::new();
        let volume = node.create("v", Some(FsType::Ext4));
        node.host.fail(op, 1);
        let message = internal(node.stage(&volume.id, &fs_cap()));
        assert!(message.contains("injected"), "{op:?}: {message}");
        node.assert_clean();
        assert!(node.record(&volume.id).staged.is_none(), "{op:?}");
        node.stage(&volume.id, &fs_cap()).unwrap_or_else(|e| panic!("{op:?}: the retry converges: {e:?}"));
    }
}

#[test]
fn a_failed_record_save_after_stage_unmounts_and_detaches() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.break_next_save();
    assert!(internal(node.stage(&volume.id, &fs_cap())).contains("store.save"));
    node.assert_clean();
    assert!(node.record(&volume.id).staged.is_none());
    node.stage(&volume.id, &fs_cap()).unwrap();
}

#[test]
fn staging_elsewhere_while_attached_is_already_exists() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    let err = node.engine.stage_volume(&volume.id, &node.arg("other"), &fs_cap()).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");
}

#[test]
fn a_foreign_mount_at_the_staging_path_is_left_alone() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    std::fs::create_dir_all(node.path("staging")).unwrap();
    node.host.mount_foreign("/dev/sdz1", "ext4", &node.path("staging"));
    let err = node.stage(&volume.id, &fs_cap()).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains("another mount")), "{err:?}");
    assert!(node.host.attached().is_empty());
    assert_eq!(node.host.mounts().len(), 1, "the foreign mount stays");
}

#[test]
fn missing_image_is_failed_precondition() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    std::fs::remove_file(node.image(&volume.id)).unwrap();
    let err = node.stage(&volume.id, &fs_cap()).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains("missing")), "{err:?}");
    node.assert_clean();
}

#[test]
fn bad_mount_options_are_refused_before_any_device_work() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    let err = node.stage(&volume.id, &mount_cap(&["suid"], AccessMode::SingleNodeWriter)).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(node.host.calls().is_empty(), "{:?}", node.host.calls());
}

#[test]
fn xfs_is_always_mounted_nouuid_and_options_reach_mount() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Xfs));
    node.stage(&volume.id, &mount_cap(&["noatime", "discard"], AccessMode::SingleNodeWriter)).unwrap();
    let (flags, data) = node
        .host
        .calls()
        .into_iter()
        .find_map(|c| match c {
            Call::MountFilesystem { flags, data, .. } => Some((flags, data)),
            _ => None,
        })
        .unwrap();
    assert!(flags.contains(MsFlags::MS_NOATIME));
    assert_eq!(data, "discard,nouuid");
}

#[test]
fn read_only_stage_mounts_read_only_and_never_grows() {
    let node = Node::new();
    let volume = node.formatted("v", FsType::Ext4);
    node.engine.expand_volume(volume.id.as_str(), 128 * MIB as i64, 0).unwrap();
    node.host.clear_calls();
    node.stage(&volume.id, &mount_cap(&[], AccessMode::SingleNodeReaderOnly)).unwrap();
    assert!(node.host.mounts()[0].is_read_only());
    assert_eq!(node.count(|c| matches!(c, Call::GrowUnmountedExt4(_) | Call::GrowFilesystem { .. })), 0);
    assert!(node.record(&volume.id).filesystem_bytes < 128 * MIB);
}

#[test]
fn an_ext4_volume_expanded_while_unstaged_grows_before_mounting() {
    let node = Node::new();
    let volume = node.formatted("v", FsType::Ext4);
    node.engine.expand_volume(volume.id.as_str(), 128 * MIB as i64, 0).unwrap();
    node.host.clear_calls();
    node.stage(&volume.id, &fs_cap()).unwrap();
    let calls = node.host.calls();
    let grow = calls.iter().position(|c| matches!(c, Call::GrowUnmountedExt4(_))).expect("grown offline");
    let mount = calls.iter().position(|c| matches!(c, Call::MountFilesystem { .. })).unwrap();
    assert!(grow < mount, "ext4 grows before it is mounted");
    assert_eq!(node.record(&volume.id).filesystem_bytes, 128 * MIB);
    assert_eq!(node.host.filesystem_bytes(&node.image(&volume.id)), 128 * MIB);
}

#[test]
fn an_xfs_volume_expanded_while_unstaged_grows_after_mounting_and_is_verified() {
    let node = Node::new();
    let volume = node.formatted("v", FsType::Xfs);
    let bigger = volume.capacity_bytes + 64 * MIB;
    node.engine.expand_volume(volume.id.as_str(), bigger as i64, 0).unwrap();

    node.host.stall_growth();
    let message = internal(node.stage(&volume.id, &fs_cap()));
    assert!(message.contains("still has"), "a growth that did not happen is an error: {message}");
    node.assert_clean();
}

#[test]
fn an_xfs_filesystem_whose_format_a_crash_left_unrecorded_is_adopted() {
    let node = Node::new();
    let volume = node.formatted("v", FsType::Xfs);
    // What a crash between mkfs and the stage's record leaves: a filesystem the record never saw.
    let mut unrecorded = node.record(&volume.id);
    unrecorded.filesystem_bytes = 0;
    unrecorded.filesystem_usable_bytes = None;
    node.engine.store.save(&unrecorded).unwrap();
    // It already spans the device: growing it changes nothing, and that is no failure.
    node.host.stall_growth();

    node.stage(&volume.id, &fs_cap()).unwrap();
    assert_eq!(node.count(|c| matches!(c, Call::MakeFilesystem { .. })), 1, "formatted once, never again");
    let record = node.record(&volume.id);
    assert_eq!(record.filesystem_bytes, record.capacity_bytes);
    assert!(record.filesystem_usable_bytes.is_some());
}

#[test]
fn a_formatted_btrfs_volume_is_not_expanded_to_a_size_the_kernel_cannot_grow_it_to() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Btrfs));
    // Never formatted: any size is fine, mkfs makes it whole.
    node.engine.expand_volume(volume.id.as_str(), 128 * MIB as i64, 0).unwrap();
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap();

    let err = node.engine.expand_volume(volume.id.as_str(), 200 * MIB as i64, 0).unwrap_err();
    assert!(matches!(err, crate::Error::OutOfRange(_)), "{err:?}");
    assert_eq!(node.record(&volume.id).capacity_bytes, 128 * MIB, "nothing grew");
    node.engine.expand_volume(volume.id.as_str(), 256 * MIB as i64, 0).unwrap();
    node.stage(&volume.id, &fs_cap()).unwrap();
    assert_eq!(node.record(&volume.id).filesystem_bytes, 256 * MIB);
}

#[test]
fn node_expansion_grows_online_and_checks_the_result() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Xfs));
    node.stage(&volume.id, &fs_cap()).unwrap();
    let bigger = volume.capacity_bytes + 64 * MIB;
    node.engine.expand_volume(volume.id.as_str(), bigger as i64, 0).unwrap();
    let staging = node.arg("staging");

    let err = node.engine.node_expand_volume(&volume.id, &staging, (bigger + MIB) as i64).unwrap_err();
    assert!(matches!(err, Error::OutOfRange(_)), "more than the controller gave: {err:?}");
    let err = node.engine.node_expand_volume(&volume.id, &node.arg("elsewhere"), 0).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");

    node.host.fail(Op::GrowFilesystem, 1);
    assert!(internal(node.engine.node_expand_volume(&volume.id, &staging, 0).map(drop)).contains("injected"));
    assert!(node.record(&volume.id).filesystem_bytes < bigger, "a failed growth is not recorded");

    let size = node.engine.node_expand_volume(&volume.id, &staging, bigger as i64).unwrap();
    assert_eq!(size, bigger);
    assert!(node.host.calls().contains(&Call::RefreshCapacity(node.record(&volume.id).staged.unwrap().device)));
    assert_eq!(node.record(&volume.id).filesystem_bytes, bigger);
    assert_eq!(node.host.filesystem_bytes(&node.image(&volume.id)), bigger);

    node.host.clear_calls();
    node.engine.node_expand_volume(&volume.id, &staging, bigger as i64).unwrap();
    assert_eq!(node.count(|c| matches!(c, Call::GrowFilesystem { .. })), 0, "idempotent");
}

#[test]
fn node_expansion_of_an_unattached_volume_is_failed_precondition() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.host.reboot();
    let err = node.engine.node_expand_volume(&volume.id, &node.arg("staging"), 0).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
}

#[test]
fn publish_binds_the_staging_mount_with_the_recorded_flags() {
    let node = Node::with_options(&["suid"], true);
    let volume = node.create("v", Some(FsType::Ext4));
    let cap = mount_cap(&["noexec", "suid"], AccessMode::SingleNodeWriter);
    node.stage(&volume.id, &cap).unwrap();
    node.publish(&volume.id, "target", &cap, true).unwrap();
    let flags = node.host.calls().into_iter().find_map(|c| match c {
        Call::Bind { flags, source, .. } => {
            assert_eq!(source, node.path("staging"));
            Some(flags)
        }
        _ => None,
    });
    let flags = flags.unwrap();
    assert!(flags.contains(MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY | MsFlags::MS_NODEV));
    assert!(!flags.contains(MsFlags::MS_NOSUID), "the operator allowed suid");
    let published = &node.record(&volume.id).published[&node.path("target")];
    assert!(published.read_only && !published.block);
    assert_eq!(published.mount_flags, vec!["noexec".to_owned(), "suid".to_owned()]);
    // Same again: already done.
    node.host.clear_calls();
    node.publish(&volume.id, "target", &cap, true).unwrap();
    assert_eq!(node.count(|c| matches!(c, Call::Bind { .. })), 0);
    // Different configuration at the same target.
    let err = node.publish(&volume.id, "target", &cap, false).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");
}

#[test]
fn block_publish_binds_the_device_node() {
    let node = Node::new();
    let volume = node.create("b", None);
    node.stage(&volume.id, &block_cap()).unwrap();
    assert!(node.host.mounts().is_empty(), "block stage mounts nothing");
    node.publish(&volume.id, "device", &block_cap(), false).unwrap();
    let device = node.record(&volume.id).staged.unwrap().device;
    assert!(node.host.calls().contains(&Call::Bind {
        source: device.clone(),
        target: node.path("device"),
        flags: MsFlags::MS_NOSUID
    }));
    assert!(node.path("device").is_file(), "a block target is a file");
    node.host.clear_calls();
    node.publish(&volume.id, "device", &block_cap(), false).unwrap();
    assert_eq!(node.count(|c| matches!(c, Call::Bind { .. })), 0, "recognised through devtmpfs's root");
}

#[test]
fn single_writer_refuses_a_second_target() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    let cap = mount_cap(&[], AccessMode::SingleNodeSingleWriter);
    node.stage(&volume.id, &cap).unwrap();
    node.publish(&volume.id, "one", &cap, false).unwrap();
    let err = node.publish(&volume.id, "two", &cap, false).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert!(!node.path("two").exists(), "the refused target was not created");
    let multi = mount_cap(&[], AccessMode::SingleNodeMultiWriter);
    node.publish(&volume.id, "two", &multi, false).unwrap();
}

#[test]
fn a_failed_publish_removes_the_target_it_created() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.host.fail(Op::Bind, 1);
    assert!(internal(node.publish(&volume.id, "target", &fs_cap(), false)).contains("injected"));
    assert!(!node.path("target").exists());
    // A target the CO made is the CO's: it stays.
    std::fs::create_dir(node.path("mine")).unwrap();
    node.host.fail(Op::Bind, 1);
    assert!(node.publish(&volume.id, "mine", &fs_cap(), false).is_err());
    assert!(node.path("mine").is_dir());
}

#[test]
fn a_failed_record_save_after_publish_unmounts_and_removes_the_target() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.break_next_save();
    assert!(internal(node.publish(&volume.id, "target", &fs_cap(), false)).contains("store.save"));
    assert!(!node.path("target").exists());
    assert_eq!(node.host.mount_points(), vec![node.path("staging")], "only the staging mount is left");
}

#[test]
fn publish_without_stage_stages_again_and_undoes_that_if_publishing_fails() {
    // kubernetes#106729: NodePublish after a failed NodeUnstage, with nothing staged.
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.host.fail(Op::Bind, 1);
    assert!(node.publish(&volume.id, "target", &fs_cap(), false).is_err());
    node.assert_clean();
    assert!(node.record(&volume.id).staged.is_none(), "the undone stage is not recorded");

    node.publish(&volume.id, "target", &fs_cap(), false).unwrap();
    let record = node.record(&volume.id);
    assert!(record.staged.is_some());
    assert!(record.published.contains_key(&node.path("target")));
    assert_eq!(node.host.mount_points(), vec![node.path("staging"), node.path("target")]);
}

#[test]
fn unpublish_and_unstage_undo_everything_and_are_idempotent() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.publish(&volume.id, "target", &fs_cap(), false).unwrap();
    let err = node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains("unpublish")), "{err:?}");
    node.engine.unpublish_volume(&volume.id, &node.arg("target")).unwrap();
    assert!(!node.path("target").exists());
    node.engine.unpublish_volume(&volume.id, &node.arg("target")).unwrap();
    node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap();
    node.assert_clean();
    node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap();
    let record = node.record(&volume.id);
    assert!(record.staged.is_none() && record.published.is_empty());
}

#[test]
fn unpublish_and_unstage_leave_foreign_mounts_alone() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    std::fs::create_dir_all(node.path("target")).unwrap();
    node.host.mount_foreign("tmpfs", "tmpfs", &node.path("target"));
    let err = node.engine.unpublish_volume(&volume.id, &node.arg("target")).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    std::fs::create_dir_all(node.path("staging")).unwrap();
    node.host.mount_foreign("/dev/sdz1", "ext4", &node.path("staging"));
    node.stage(&volume.id, &fs_cap()).unwrap_err();
    let err = node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert_eq!(node.host.mounts().len(), 2);
}

#[test]
fn unstage_refuses_to_detach_a_device_mounted_elsewhere() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    let device = node.record(&volume.id).staged.unwrap().device;
    std::fs::create_dir_all(node.path("sneaky")).unwrap();
    use crate::host::Host;
    let sneaky = crate::paths::Pinned::open(&node.path("sneaky")).unwrap();
    node.host.mount_filesystem(&device, &sneaky, FsType::Ext4, MsFlags::empty(), "").unwrap();
    let err = node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains("still mounted")), "{err:?}");
    assert_eq!(node.host.attached().len(), 1, "not detached under a live mount");
}

#[test]
fn reconcile_after_a_reboot_restores_stage_and_publications_with_their_flags() {
    let mut node = Node::with_options(&[], true);
    let fs_volume = node.create("v", Some(FsType::Ext4));
    let block_volume = node.create("b", None);
    let cap = mount_cap(&["noexec", "noatime"], AccessMode::SingleNodeWriter);
    node.stage(&fs_volume.id, &cap).unwrap();
    node.publish(&fs_volume.id, "target", &cap, true).unwrap();
    node.engine.stage_volume(&block_volume.id, &node.arg("bstaging"), &block_cap()).unwrap();
    node.engine
        .publish_volume(&block_volume.id, &node.arg("bstaging"), &node.arg("device"), &block_cap(), false)
        .unwrap();
    let binds_before: Vec<Call> = node.host.calls().into_iter().filter(|c| matches!(c, Call::Bind { .. })).collect();

    node.host.reboot();
    node.restart();
    node.host.clear_calls();
    let report = node.engine.reconcile_on_start();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.restored.len(), 4, "{:?}", report.restored);
    let binds_after: Vec<Call> = node.host.calls().into_iter().filter(|c| matches!(c, Call::Bind { .. })).collect();
    // The device number may differ after a reboot; everything else must be what publish did.
    let normalise = |calls: Vec<Call>| -> Vec<(PathBuf, MsFlags)> {
        let mut binds: Vec<(PathBuf, MsFlags)> = calls
            .into_iter()
            .map(|c| match c {
                Call::Bind { target, flags, .. } => (target, flags),
                _ => unreachable!(),
            })
            .collect();
        binds.sort();
        binds
    };
    assert_eq!(normalise(binds_after), normalise(binds_before), "restored with exactly the published flags");
    assert_eq!(node.host.attached().len(), 2);
    assert_eq!(node.host.mounts().len(), 3, "staging, target and device");
    assert_eq!(node.count(|c| matches!(c, Call::MakeFilesystem { .. })), 0, "never formatted again");

    node.host.clear_calls();
    let again = node.engine.reconcile_on_start();
    assert!(again.restored.is_empty() && again.problems.is_empty(), "{again:?}");
    assert!(
        node.host.calls().iter().all(|c| matches!(c, Call::Probe(_) | Call::Thaw(_))),
        "a second reconcile changes nothing: {:?}",
        node.host.calls()
    );
}

#[test]
fn reconcile_in_node_mode_restages_but_leaves_publications_to_kubelet() {
    let node = Node::with_options(&[], false);
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.publish(&volume.id, "target", &fs_cap(), false).unwrap();
    node.host.reboot();
    let report = node.engine.reconcile_on_start();
    assert_eq!(report.restored.len(), 1, "{report:?}");
    assert_eq!(node.host.mount_points(), vec![node.path("staging")]);
    assert!(node.record(&volume.id).published.is_empty(), "the publication is forgotten; kubelet publishes again");
}

#[test]
fn reconcile_detaches_leaked_devices_and_reports_orphans() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    use crate::host::Host;
    node.host.attach_loop(&node.image(&volume.id), false, 4096).unwrap();
    std::fs::write(node.engine.pool.dir().join(format!("{}.img", VolumeId::for_name("ghost"))), b"").unwrap();
    let report = node.engine.reconcile_on_start();
    assert_eq!(report.detached, vec![volume.id.to_string()]);
    assert!(node.host.attached().is_empty());
    assert!(report.problems.iter().any(|p| p.contains("no volume record")), "{report:?}");
}

#[test]
fn reconcile_reports_a_volume_it_cannot_restore_and_goes_on() {
    let node = Node::new();
    let broken = node.create("broken", Some(FsType::Ext4));
    let fine = node.create("fine", Some(FsType::Ext4));
    node.stage(&broken.id, &fs_cap()).unwrap();
    node.engine.stage_volume(&fine.id, &node.arg("staging2"), &fs_cap()).unwrap();
    node.host.reboot();
    std::fs::remove_file(node.image(&broken.id)).unwrap();
    let report = node.engine.reconcile_on_start();
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert!(report.problems[0].contains("missing"));
    assert_eq!(report.restored.len(), 1);
}

#[test]
fn stats_for_filesystems_and_block_devices() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.publish(&volume.id, "target", &fs_cap(), false).unwrap();
    let (stats, condition) = node.engine.volume_stats(&volume.id, &node.arg("target")).unwrap();
    assert!(matches!(stats, super::VolumeStats::Filesystem(u) if u.total_bytes == volume.capacity_bytes));
    assert_eq!(condition, None);
    let err = node.engine.volume_stats(&volume.id, &node.arg("nowhere")).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)));

    let block = node.create("b", None);
    node.engine.stage_volume(&block.id, &node.arg("bstaging"), &block_cap()).unwrap();
    let (stats, _) = node.engine.volume_stats(&block.id, &node.arg("bstaging")).unwrap();
    assert_eq!(stats, super::VolumeStats::Block { total_bytes: block.capacity_bytes });
}

#[test]
fn conditions_name_what_is_wrong() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    let condition = |node: &Node| node.engine.volume_condition(&node.record(&volume.id)).unwrap();
    assert_eq!(condition(&node), None, "unstaged and healthy");
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.publish(&volume.id, "target", &fs_cap(), false).unwrap();
    assert_eq!(condition(&node), None);

    node.host.set_filesystem_errors(&node.image(&volume.id), 3);
    assert!(condition(&node).unwrap().contains("3 error(s)"));
    node.host.set_filesystem_errors(&node.image(&volume.id), 0);

    use crate::host::Host;
    node.host.unmount(&node.path("target")).unwrap();
    assert!(condition(&node).unwrap().contains("publish mount"));
    node.host.unmount(&node.path("staging")).unwrap();
    assert!(condition(&node).unwrap().contains("staging mount"));
    node.host.reboot();
    assert!(condition(&node).unwrap().contains("loop device is gone"));
    std::fs::remove_file(node.image(&volume.id)).unwrap();
    assert!(condition(&node).unwrap().contains("missing"));
}

#[test]
fn a_staged_volume_cannot_be_deleted_and_an_attached_one_neither() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    let err = node.engine.delete_volume(volume.id.as_str()).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap();
    use crate::host::Host;
    node.host.attach_loop(&node.image(&volume.id), false, 4096).unwrap();
    let err = node.engine.delete_volume(volume.id.as_str()).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains("attached")), "{err:?}");
    node.host.reboot();
    node.engine.delete_volume(volume.id.as_str()).unwrap();
    assert!(!node.image(&volume.id).exists());
}

#[test]
fn snapshots_hold_a_mounted_writable_source_still_and_always_thaw() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    // The test's pool is wherever the temp dir is: a reflink pool flushes, any other freezes.
    let reflinks = crate::sys::copy::shares_blocks(node.image(&volume.id).parent().unwrap());
    node.engine.create_snapshot("snap", volume.id.as_str()).unwrap();
    let calls = node.host.calls();
    let staging = node.path("staging");
    if reflinks {
        assert!(calls.contains(&Call::SyncFilesystem(staging.clone())), "flushed before the reflink");
        assert_eq!(node.count(|c| matches!(c, Call::Freeze(_))), 0, "a reflink needs no freeze");
    } else {
        let freeze = calls.iter().position(|c| *c == Call::Freeze(staging.clone())).expect("frozen");
        let thaw = calls.iter().position(|c| *c == Call::Thaw(staging.clone())).expect("thawed");
        assert!(freeze < thaw);
        assert_eq!(node.count(|c| matches!(c, Call::SyncFilesystem(_))), 0);
    }
    assert!(node.host.frozen().is_empty());

    node.host.fail(if reflinks { Op::SyncFilesystem } else { Op::Freeze }, 1);
    assert!(node.engine.create_snapshot("snap2", volume.id.as_str()).is_err());
    assert!(node.engine.snapshot(crate::ids::SnapshotId::for_name("snap2").as_str()).is_err(), "nothing recorded");

    // Unmounted (after a reboot): nothing to hold still.
    node.host.reboot();
    node.host.clear_calls();
    node.engine.create_snapshot("snap3", volume.id.as_str()).unwrap();
    assert_eq!(node.count(|c| matches!(c, Call::Freeze(_) | Call::SyncFilesystem(_))), 0);
}

#[test]
fn group_snapshots_freeze_their_mounted_members_even_on_a_reflink_pool() {
    let node = Node::new();
    let a = node.create("a", Some(FsType::Ext4));
    let b = node.create("b", Some(FsType::Ext4));
    node.stage(&a.id, &fs_cap()).unwrap();
    node.engine.create_group_snapshot("g", &[a.id.as_str().to_owned(), b.id.as_str().to_owned()]).unwrap();
    assert_eq!(node.count(|c| matches!(c, Call::Freeze(_))), 1, "the mounted member, frozen");
    assert_eq!(node.count(|c| matches!(c, Call::SyncFilesystem(_))), 0);
    assert!(node.host.frozen().is_empty());
}

#[test]
fn capacity_counts_what_a_volume_wrote_while_staged_once_it_is_unstaged() {
    use std::io::Write;
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    let before = node.engine.capacity(None).unwrap().allocated_bytes;
    node.stage(&volume.id, &fs_cap()).unwrap();
    // What the loop device would write through the staged filesystem.
    let mut image = std::fs::OpenOptions::new().write(true).open(node.image(&volume.id)).unwrap();
    image.write_all(&vec![1u8; 8 << 20]).unwrap();
    image.sync_all().unwrap();
    assert!(node.engine.capacity(None).unwrap().allocated_bytes >= before + (8 << 20), "staged");
    node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap();
    let after = node.engine.capacity(None).unwrap().allocated_bytes;
    assert!(after >= before + (8 << 20), "unstaged: {after} bytes, {before} before the writes");
}

#[test]
fn a_block_layout_never_touches_filesystem_tools() {
    let node = Node::new();
    let volume = node.create("b", None);
    assert_eq!(volume.layout, Layout::Block);
    node.stage(&volume.id, &block_cap()).unwrap();
    node.publish(&volume.id, "device", &block_cap(), false).unwrap();
    assert_eq!(node.count(|c| matches!(c, Call::Probe(_) | Call::MakeFilesystem { .. })), 0);
}

#[test]
fn a_missing_filesystem_tool_is_reported_before_any_device_work() {
    let node = Node::new();
    node.host.uninstall("mkfs.xfs");
    let support = node.engine.filesystem_support();
    let xfs = support.iter().find(|s| s.fs == FsType::Xfs).unwrap();
    assert!(!xfs.format && xfs.grow);
    assert!(support.iter().find(|s| s.fs == FsType::Ext4).unwrap().format);

    let err = node
        .engine
        .create_volume(&CreateVolume {
            name: "x".into(),
            required_bytes: 0,
            limit_bytes: 0,
            capabilities: vec![Capability {
                access_type: AccessType::Mount {
                    fs_type: Some(FsType::Xfs),
                    mount_flags: vec![],
                    volume_mount_group: String::new(),
                },
                mode: AccessMode::SingleNodeWriter,
            }],
            parameters: VolumeParameters::default(),
            requisite_nodes: None,
            content_source: None,
            mutable_parameters: Default::default(),
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::FailedPrecondition(ref m) if m.contains("mkfs.xfs") && m.contains("xfsprogs")),
        "{err:?}"
    );

    // A volume created while the tools were there, staged after they went.
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Xfs));
    node.host.uninstall("blkid");
    let err = node.stage(&volume.id, &fs_cap()).unwrap_err();
    assert!(
        matches!(err, Error::FailedPrecondition(ref m) if m.contains("blkid") && m.contains("util-linux")),
        "{err:?}"
    );
    assert!(node.host.calls().is_empty(), "refused before attaching: {:?}", node.host.calls());

    // Formatted already and not outgrown: nothing to run, so it stages.
    let node = Node::new();
    let volume = node.formatted("v", FsType::Ext4);
    node.host.uninstall("mkfs.ext4");
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap();
    // Outgrown: the growth tools are needed.
    node.engine.expand_volume(volume.id.as_str(), 128 * MIB as i64, 0).unwrap();
    node.host.uninstall("resize2fs");
    let err = node.stage(&volume.id, &fs_cap()).unwrap_err();
    assert!(
        matches!(err, Error::FailedPrecondition(ref m) if m.contains("grow") && m.contains("resize2fs")),
        "{err:?}"
    );
}

#[test]
fn attachments_are_found_by_inode_whatever_path_the_kernel_shows() {
    // A plinth in a restarted pod sees its predecessor's attachments under another path.
    let mut node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.host.show_backing_from_another_namespace();
    node.restart();
    node.host.clear_calls();
    let report = node.engine.reconcile_on_start();
    assert!(report.restored.is_empty() && report.problems.is_empty(), "{report:?}");
    assert_eq!(node.count(|c| matches!(c, Call::Attach { .. })), 0, "no second attachment");
    node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap();
    node.assert_clean();
    node.engine.delete_volume(volume.id.as_str()).unwrap();
}

#[test]
fn reconcile_detaches_devices_whose_image_was_deleted_unless_mounted() {
    let node = Node::new();
    let gone = node.create("gone", None);
    let busy = node.create("busy", Some(FsType::Ext4));
    use crate::host::Host;
    let leaked = node.host.attach_loop(&node.image(&gone.id), false, 4096).unwrap();
    node.stage(&busy.id, &fs_cap()).unwrap();
    node.host.delete_backing_file(&node.image(&gone.id));
    node.host.delete_backing_file(&node.image(&busy.id));
    let report = node.engine.reconcile_on_start();
    assert!(report.detached.iter().any(|d| d.contains(&leaked.path().display().to_string())), "{report:?}");
    assert!(report.problems.iter().any(|p| p.contains("still mounted")), "{report:?}");
    assert_eq!(node.host.attached().len(), 1, "the mounted one stays");
}

#[test]
fn a_volume_formatted_for_512_byte_sectors_is_attached_so_and_remembered() {
    let mut node = Node::new();
    let volume = node.create("legacy", Some(FsType::Ext4));
    // What plinth before the fixed 4096 geometry left: ext4 with 1 KiB blocks, a schema-1
    // record (no geometry).
    node.host.put_content(
        &node.image(&volume.id),
        Probe::Filesystem { fs: "ext4".into(), block_size: Some(1024) },
        volume.capacity_bytes,
    );
    let mut legacy = node.record(&volume.id);
    legacy.loop_block_size = None;
    legacy.filesystem_bytes = legacy.capacity_bytes;
    node.engine.store.save(&legacy).unwrap();

    node.stage(&volume.id, &fs_cap()).unwrap();
    let attaches: Vec<u32> = node
        .host
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Attach { block_size, .. } => Some(block_size),
            _ => None,
        })
        .collect();
    assert_eq!(attaches, vec![4096, 512], "probed at 4096, then attached for its 512-byte sectors");
    assert_eq!(node.host.attached().len(), 1);
    assert_eq!(node.host.mounts().len(), 1, "it mounts");
    assert_eq!(node.record(&volume.id).loop_block_size, Some(512), "remembered with the stage");
    assert_eq!(node.count(|c| matches!(c, Call::MakeFilesystem { .. })), 0, "never reformatted");

    node.engine.unstage_volume(&volume.id, &node.arg("staging")).unwrap();
    node.restart();
    node.host.clear_calls();
    node.stage(&volume.id, &fs_cap()).unwrap();
    assert_eq!(node.count(|c| matches!(c, Call::Attach { block_size: 512, .. })), 1, "straight to 512 next time");
    assert_eq!(node.count(|c| matches!(c, Call::Attach { .. })), 1);
}

#[test]
fn new_volumes_record_the_fixed_geometry_and_copies_inherit_it() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    assert_eq!(volume.loop_block_size, Some(4096));
    node.stage(&volume.id, &fs_cap()).unwrap();
    assert!(node.host.calls().iter().all(|c| !matches!(c, Call::Attach { block_size, .. } if *block_size != 4096)));
}

#[test]
fn one_engine_per_data_dir() {
    let mut node = Node::new();
    let config = || EngineConfig {
        data_dir: node.dir.path().join("data"),
        node_id: "node-b".into(),
        allowed_roots: vec![node.dir.path().join("root")],
        default_volume_size: MIB,
        pool_capacity: None,
        allowed_mount_options: vec![],
        restore_publications: false,
    };
    let err = Engine::open_with_host(config(), Arc::new(node.host.clone())).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains("another plinth")), "{err:?}");
    node.engine.0 = None;
    Engine::open_with_host(config(), Arc::new(node.host.clone())).expect("free once the first is gone");
}

#[test]
fn interrupted_creations_are_undone_and_deletions_completed_at_the_next_start() {
    use crate::store::Phase;
    let mut node = Node::new();
    let kept = node.create("kept", Some(FsType::Ext4));
    let half_made = node.create("half-made", Some(FsType::Ext4));
    let half_deleted = node.create("half-deleted", None);
    for (volume, phase) in [(&half_made, Phase::Creating), (&half_deleted, Phase::Deleting)] {
        let mut record = node.record(&volume.id);
        record.phase = phase;
        node.engine.store.save(&record).unwrap();
    }
    node.engine.create_snapshot("snap", kept.id.as_str()).unwrap();
    let snap = crate::ids::SnapshotId::for_name("snap");
    let mut snapshot = node.engine.snapshots.load(&snap).unwrap().unwrap();
    snapshot.phase = Phase::Creating;
    node.engine.snapshots.save(&snapshot).unwrap();
    assert!(node.engine.volume(half_made.id.as_str()).unwrap().is_none(), "an intent is not a volume");

    node.restart();
    assert!(node.engine.store.load_any(&half_made.id).unwrap().is_none());
    assert!(!node.image(&half_made.id).exists(), "no image of an unacknowledged creation is left");
    assert!(node.engine.store.load_any(&half_deleted.id).unwrap().is_none());
    assert!(!node.image(&half_deleted.id).exists());
    assert!(node.engine.snapshots.load_any(&snap).unwrap().is_none());
    assert!(!node.engine.pool.snapshot_path(&snap).exists());
    assert_eq!(node.engine.volumes().unwrap().len(), 1);
    assert!(node.image(&kept.id).exists());
}

#[test]
fn a_failed_step_of_create_delete_and_snapshot_leaves_nothing_half_made() {
    let node = Node::new();
    for point in ["create.intent_saved", "create.image_made"] {
        crate::failpoint::arm(point, 1);
        let err = node.engine.create_volume(&CreateVolume {
            name: "x".into(),
            required_bytes: 64 * MIB as i64,
            limit_bytes: 0,
            capabilities: vec![fs_cap()],
            parameters: VolumeParameters::default(),
            requisite_nodes: None,
            content_source: None,
            mutable_parameters: Default::default(),
        });
        assert!(err.is_err(), "{point}");
        assert!(node.engine.store.list_any().unwrap().is_empty(), "{point}: no record");
        assert_eq!(std::fs::read_dir(node.engine.pool.dir()).unwrap().count(), 1, "{point}: only snapshots/");
    }
    let volume = node.create("v", Some(FsType::Ext4));
    for point in ["snapshot.frozen", "snapshot.intent_saved", "snapshot.copied"] {
        crate::failpoint::arm(point, 1);
        assert!(node.engine.create_snapshot("s", volume.id.as_str()).is_err(), "{point}");
        assert!(node.engine.snapshots.list_any().unwrap().is_empty(), "{point}");
        assert_eq!(std::fs::read_dir(node.engine.pool.dir().join("snapshots")).unwrap().count(), 0, "{point}");
    }
    crate::failpoint::arm("delete.image_removed", 1);
    assert!(node.engine.delete_volume(volume.id.as_str()).is_err());
    assert!(node.engine.volume(volume.id.as_str()).unwrap().is_none(), "half deleted is not listed");
    node.engine.delete_volume(volume.id.as_str()).expect("a retried delete completes");
    assert!(node.engine.store.list_any().unwrap().is_empty());
}

#[test]
fn reconcile_thaws_a_filesystem_a_crashed_snapshot_left_frozen() {
    let mut node = Node::new();
    let volume = node.create("v", Some(FsType::Ext4));
    node.stage(&volume.id, &fs_cap()).unwrap();
    node.host.leave_frozen(&node.path("staging"));
    node.restart();
    let report = node.engine.reconcile_on_start();
    assert!(report.restored.iter().any(|r| r.contains("thawed")), "{report:?}");
    assert!(node.host.frozen().is_empty());
}

#[test]
fn a_growth_a_crash_left_unrecorded_is_recognised_on_retry() {
    let node = Node::new();
    let volume = node.create("v", Some(FsType::Xfs));
    node.stage(&volume.id, &fs_cap()).unwrap();
    let bigger = volume.capacity_bytes + 64 * MIB;
    node.engine.expand_volume(volume.id.as_str(), bigger as i64, 0).unwrap();
    // The filesystem grew, then the process died before recording it.
    crate::failpoint::arm("node_expand.grown", 1);
    assert!(node.engine.node_expand_volume(&volume.id, &node.arg("staging"), 0).is_err());
    assert!(node.record(&volume.id).filesystem_bytes < bigger);
    node.engine.node_expand_volume(&volume.id, &node.arg("staging"), 0).expect("the retry sees the growth done");
    assert_eq!(node.record(&volume.id).filesystem_bytes, bigger);
}
