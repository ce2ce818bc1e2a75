//! plinth's custom resources (group plinth.csi.dev): `Volume` (schema deploy/crd-volumes.yaml),
//! `Snapshot` and `GroupSnapshot` (deploy/crd-snapshots.yaml). The schemas are the one source of
//! truth; these types are how plinth reads and writes them. Each object names the node whose
//! agent does its disk work (label `plinth.csi.dev/node`): node-local data never moves, so the
//! work always happens where the data is.

use kube::{CustomResource, ResourceExt};
use plinth_controller::context::VolumeContext;
use plinth_engine::model::{FsType, Layout, Provisioning};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(group = "plinth.csi.dev", version = "v1alpha1", kind = "Volume", status = "VolumeStatus", schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    pub node: String,
    pub size_bytes: i64,
    pub volume_mode: VolumeMode,
    /// The filesystem of a Filesystem volume (the schema allows ext4, xfs, btrfs; absent: ext4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<FsType>,
    /// The schema defaults it to thin.
    #[serde(default)]
    pub provisioning: Provisioning,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mkfs_options: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_ref: Option<ClaimRef>,
    /// What the image is copied from (a snapshot or a volume on the same node); absent: blank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_source: Option<VolumeSource>,
}

/// A Volume's content source, by CSI ID: `{snapshot: snap-…}` or `{volume: vol-…}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum VolumeSource {
    Snapshot(String),
    Volume(String),
}

impl VolumeSpec {
    /// The layout the node makes the image with.
    pub fn layout(&self) -> Layout {
        match self.volume_mode {
            VolumeMode::Block => Layout::Block,
            VolumeMode::Filesystem => Layout::Filesystem { fs_type: self.fs_type.unwrap_or(FsType::Ext4) },
        }
    }
}

impl Volume {
    /// The volume context every path hands out for this Volume (PV attributes, CreateVolume).
    pub fn volume_context(&self) -> VolumeContext {
        VolumeContext {
            name: self.name_any(),
            fs_type: self.spec.layout().fs_type(),
            provisioning: self.spec.provisioning,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeMode {
    Filesystem,
    Block,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The CSI volume ID on the node (the PV's volumeHandle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why the phase is Failed, as the CSI code the node's engine answered (see [`reason`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Values of [`VolumeStatus::reason`]: the CSI codes of the failures an agent reports (what its
/// engine answered), by name.
pub mod reason {
    use tonic::Code;

    /// The node has no room for the image: another node may have.
    pub const RESOURCE_EXHAUSTED: &str = "ResourceExhausted";

    const NAMES: [(&str, Code); 4] = [
        (RESOURCE_EXHAUSTED, Code::ResourceExhausted),
        ("OutOfRange", Code::OutOfRange),
        ("InvalidArgument", Code::InvalidArgument),
        ("AlreadyExists", Code::AlreadyExists),
    ];

    /// The reason an agent reports for a failure of `code`; `None` for codes that are not a
    /// final answer about the Volume (the agent retries those without reporting Failed).
    pub fn of(code: Code) -> Option<&'static str> {
        NAMES.iter().find(|(_, c)| *c == code).map(|(name, _)| *name)
    }

    /// The code a reported reason stands for.
    pub fn code(reason: &str) -> Option<Code> {
        NAMES.iter().find(|(name, _)| *name == reason).map(|(_, code)| *code)
    }

    #[cfg(test)]
    #[test]
    fn every_reason_names_its_code_both_ways() {
        for (name, code) in NAMES {
            assert_eq!(of(code), Some(name));
            assert_eq!(self::code(name), Some(code));
        }
        assert_eq!(of(Code::Internal), None);
        assert_eq!(self::code("Internal"), None);
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Ready,
    Failed,
    Deleting,
}

/// A snapshot of one volume, taken by the agent of the node holding it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "plinth.csi.dev",
    version = "v1alpha1",
    kind = "Snapshot",
    status = "SnapshotStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    pub node: String,
    /// The CSI volume ID of the source (a volume in `node`'s pool).
    pub source_volume_id: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The CSI snapshot ID (a VolumeSnapshotContent's snapshotHandle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// The source's size when it was taken: the smallest volume it restores into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// Nanoseconds since the Unix epoch (as a VolumeSnapshotContent's creationTime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A crash-consistent set of snapshots of volumes on one node, taken together.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "plinth.csi.dev",
    version = "v1alpha1",
    kind = "GroupSnapshot",
    status = "GroupSnapshotStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotSpec {
    pub node: String,
    pub source_volume_ids: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_snapshot_id: Option<String>,
    /// Nanoseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberSnapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberSnapshot {
    pub volume_id: String,
    pub snapshot_id: String,
    pub size_bytes: i64,
    pub creation_time: i64,
}
