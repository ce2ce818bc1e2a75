//! What plinth knows about a volume, as persisted in its metadata record.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{GroupSnapshotId, SnapshotId, VolumeId};
use crate::size::MIB;
use crate::store::{Phase, Record};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    pub const ALL: [FsType; 3] = [FsType::Ext4, FsType::Xfs, FsType::Btrfs];

    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            "btrfs" => Ok(FsType::Btrfs),
            other => {
                Err(Error::InvalidArgument(format!("unsupported fsType {other:?}: plinth formats ext4, xfs or btrfs")))
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        }
    }

    /// The smallest device this machine's mkfs accepts (mkfs.xfs: 300 MB; mkfs.btrfs: 109 MiB).
    pub fn minimum_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => MIB,
            FsType::Xfs => 300 * MIB,
            FsType::Btrfs => 109 * MIB,
        }
    }

    /// The smallest size the kernel grows this filesystem to: it refuses to resize btrfs below
    /// 256 MiB (EINVAL), even to the size it already has.
    pub fn smallest_growth_target(self) -> u64 {
        match self {
            FsType::Btrfs => 256 * MIB,
            FsType::Ext4 | FsType::Xfs => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Provisioning {
    /// Sparse image: space is taken as data is written.
    #[default]
    Thin,
    /// Preallocated with fallocate: writes never hit ENOSPC in the pool.
    Thick,
}

impl Provisioning {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "thin" => Ok(Provisioning::Thin),
            "thick" => Ok(Provisioning::Thick),
            other => Err(Error::InvalidArgument(format!("unsupported provisioning {other:?}: use thin or thick"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Provisioning::Thin => "thin",
            Provisioning::Thick => "thick",
        }
    }
}

/// How the volume is consumed. Fixed at creation: a block volume is never formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Layout {
    Filesystem { fs_type: FsType },
    Block,
}

impl Layout {
    pub fn fs_type(self) -> Option<FsType> {
        match self {
            Layout::Filesystem { fs_type } => Some(fs_type),
            Layout::Block => None,
        }
    }
}

/// Node-side: the volume is attached and (for filesystems) mounted at its staging path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub staging_path: PathBuf,
    pub device: PathBuf,
    pub read_only: bool,
    /// Whether the filesystem is mounted at the staging path (false: attached for block use).
    #[serde(default)]
    pub filesystem_mounted: bool,
    /// The capability's mount flags, kept so a restart can restore the same mount.
    #[serde(default)]
    pub mount_flags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub read_only: bool,
    /// The device node is bound here (raw block access) rather than the staged filesystem.
    #[serde(default)]
    pub block: bool,
    #[serde(default)]
    pub mount_flags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub capacity_bytes: u64,
    pub layout: Layout,
    pub provisioning: Provisioning,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(default)]
    pub staged: Option<Staged>,
    /// Target path → how it is published.
    #[serde(default)]
    pub published: BTreeMap<PathBuf, Published>,
    /// What the volume was created from (a snapshot or another volume), if anything.
    #[serde(default)]
    pub content_source: Option<ContentSource>,
    /// The device size the filesystem was last made or grown for: when the volume is larger
    /// (expanded while unstaged, restored into a bigger volume), the next stage grows it.
    #[serde(default)]
    pub filesystem_bytes: u64,
    /// Validated extra mkfs arguments (StorageClass `mkfsOptions`), used on first format.
    #[serde(default)]
    pub mkfs_options: Vec<String>,
    /// The loop device's logical block size the filesystem was made for (schema 2). `None` for
    /// volumes of schema 1, which may predate plinth's fixed 4096: found out at the next stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_block_size: Option<u32>,
    /// What the filesystem offered (statfs total) when it last matched `filesystem_bytes`: a
    /// growth is verified against it, so one a crash left unrecorded is seen as done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem_usable_bytes: Option<u64>,
    /// An intent (creating, deleting) or a volume (ready).
    #[serde(default, skip_serializing_if = "Phase::is_ready")]
    pub phase: Phase,
}

impl VolumeRecord {
    pub fn in_use(&self) -> bool {
        self.staged.is_some() || !self.published.is_empty()
    }
}

impl Record for VolumeRecord {
    type Id = VolumeId;
    const SCHEMA: u32 = 2;
    fn id(&self) -> &VolumeId {
        &self.id
    }
    fn phase(&self) -> Phase {
        self.phase
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "id", rename_all = "lowercase")]
pub enum ContentSource {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

/// A point-in-time copy of a volume's image, independent of the volume afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub name: String,
    pub source_volume_id: VolumeId,
    /// The source volume's size when the snapshot was taken (the smallest restore size).
    pub size_bytes: u64,
    pub layout: Layout,
    #[serde(default)]
    pub filesystem_bytes: u64,
    pub created_at_seconds: i64,
    pub created_at_nanos: i32,
    #[serde(default)]
    pub group_snapshot_id: Option<GroupSnapshotId>,
    /// How the copy was made ("reflink" or "sparse-copy"), for operators.
    pub copy_method: String,
    /// The source's loop block size (schema 2; `None`: unknown, found out when restored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_block_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Phase::is_ready")]
    pub phase: Phase,
}

impl Record for SnapshotRecord {
    type Id = SnapshotId;
    const SCHEMA: u32 = 2;
    fn id(&self) -> &SnapshotId {
        &self.id
    }
    fn phase(&self) -> Phase {
        self.phase
    }
}

/// A crash-consistent set of snapshots taken together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshotRecord {
    pub id: GroupSnapshotId,
    pub name: String,
    pub source_volume_ids: Vec<VolumeId>,
    pub snapshot_ids: Vec<SnapshotId>,
    pub created_at_seconds: i64,
    pub created_at_nanos: i32,
    #[serde(default, skip_serializing_if = "Phase::is_ready")]
    pub phase: Phase,
}

impl Record for GroupSnapshotRecord {
    type Id = GroupSnapshotId;
    const SCHEMA: u32 = 2;
    fn id(&self) -> &GroupSnapshotId {
        &self.id
    }
    fn phase(&self) -> Phase {
        self.phase
    }
}

/// StorageClass / CreateVolume parameters plinth understands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeParameters {
    pub fs_type: Option<FsType>,
    pub provisioning: Provisioning,
    /// Raw `mkfsOptions`; validated once the filesystem is known.
    pub mkfs_options: Option<String>,
}

pub const PARAM_FS_TYPE: &str = "fsType";
pub const PARAM_PROVISIONING: &str = "provisioning";
pub const PARAM_MKFS_OPTIONS: &str = "mkfsOptions";

/// CreateSnapshot / CreateVolumeGroupSnapshot parameters: plinth takes none of its own; keys
/// Kubernetes tooling adds are informational.
pub fn check_snapshot_parameters<'a>(params: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<()> {
    for (key, _) in params {
        if !key.starts_with(KUBERNETES_PARAM_PREFIX) {
            return Err(Error::InvalidArgument(format!("unknown snapshot parameter {key:?}: plinth takes none")));
        }
    }
    Ok(())
}

/// Parameters that may change after creation (VolumeAttributesClass / ControllerModifyVolume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MutableParameters {
    pub provisioning: Option<Provisioning>,
}

impl MutableParameters {
    pub fn parse<'a>(params: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Self> {
        let mut parsed = MutableParameters::default();
        for (key, value) in params {
            match key.as_str() {
                PARAM_PROVISIONING => parsed.provisioning = Some(Provisioning::parse(value)?),
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "mutable parameter {other:?} is not supported: plinth can change {PARAM_PROVISIONING}"
                    )));
                }
            }
        }
        Ok(parsed)
    }
}
/// Keys Kubernetes tooling adds (PVC name, namespace, …); informational, never an error.
const KUBERNETES_PARAM_PREFIX: &str = "csi.storage.k8s.io/";

impl VolumeParameters {
    pub fn parse<'a>(params: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Self> {
        let mut parsed = VolumeParameters::default();
        for (key, value) in params {
            match key.as_str() {
                PARAM_FS_TYPE => parsed.fs_type = Some(FsType::parse(value)?),
                PARAM_PROVISIONING => parsed.provisioning = Provisioning::parse(value)?,
                PARAM_MKFS_OPTIONS => parsed.mkfs_options = Some(value.clone()),
                k if k.starts_with(KUBERNETES_PARAM_PREFIX) => {}
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown parameter {other:?}: plinth understands {PARAM_FS_TYPE}, {PARAM_PROVISIONING} and {PARAM_MKFS_OPTIONS}"
                    )));
                }
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parses_parameters() {
        let p = VolumeParameters::parse(&params(&[("fsType", "xfs"), ("provisioning", "thick")])).unwrap();
        assert_eq!(
            p,
            VolumeParameters { fs_type: Some(FsType::Xfs), provisioning: Provisioning::Thick, mkfs_options: None }
        );
        let m = MutableParameters::parse(&params(&[("provisioning", "thick")])).unwrap();
        assert_eq!(m.provisioning, Some(Provisioning::Thick));
        assert!(MutableParameters::parse(&params(&[("XXX_FakeKey", "x")])).is_err());
        let p = VolumeParameters::parse(&params(&[("csi.storage.k8s.io/pvc/name", "x")])).unwrap();
        assert_eq!(p, VolumeParameters::default());
        for bad in [("fsType", "ntfs"), ("provisioning", "fat"), ("color", "blue")] {
            let err = VolumeParameters::parse(&params(&[bad])).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}");
        }
    }

    #[test]
    fn record_round_trips_through_json() {
        let record = VolumeRecord {
            id: VolumeId::for_name("a"),
            name: "a".into(),
            capacity_bytes: 5 * MIB,
            layout: Layout::Filesystem { fs_type: FsType::Btrfs },
            provisioning: Provisioning::Thick,
            created_at: 1,
            staged: Some(Staged {
                staging_path: "/s".into(),
                device: "/dev/loop1".into(),
                read_only: false,
                filesystem_mounted: true,
                mount_flags: vec!["noatime".into()],
            }),
            published: [(PathBuf::from("/t"), Published { read_only: true, block: false, mount_flags: vec![] })].into(),
            content_source: Some(ContentSource::Snapshot(SnapshotId::for_name("s"))),
            filesystem_bytes: 5 * MIB,
            loop_block_size: Some(512),
            filesystem_usable_bytes: None,
            phase: Phase::Ready,
            mkfs_options: vec!["-b".into(), "4096".into()],
        };
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<VolumeRecord>(&json).unwrap(), record);
        let tampered = json.replace(record.id.as_str(), "vol-../../x");
        assert!(serde_json::from_str::<VolumeRecord>(&tampered).is_err());
    }
}
