//! The `Volume` custom resource (group plinth.csi.dev). Its schema is deploy/crd-volumes.yaml,
//! the one source of truth; these types are how plinth reads and writes it.

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Ready,
    Failed,
    Deleting,
}
