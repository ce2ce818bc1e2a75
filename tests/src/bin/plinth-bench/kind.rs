//! The four volume kinds the control path is measured for.

use plinth_proto::csi_v1 as csi;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ext4,
    Xfs,
    Btrfs,
    Block,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Ext4, Kind::Xfs, Kind::Btrfs, Kind::Block];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ext4 => "ext4",
            Kind::Xfs => "xfs",
            Kind::Btrfs => "btrfs",
            Kind::Block => "block",
        }
    }

    pub fn fs(self) -> Option<&'static str> {
        (self != Kind::Block).then(|| self.name())
    }

    /// mkfs with exactly plinth's flags (engine/src/sys/mkfs.rs `mkfs_args`: no discard, lazy
    /// init), so the baseline formats as much as plinth does.
    pub fn mkfs(self) -> Option<(&'static str, &'static [&'static str])> {
        match self {
            Kind::Ext4 => {
                Some(("mkfs.ext4", &["-q", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]))
            }
            Kind::Xfs => Some(("mkfs.xfs", &["-q", "-K"])),
            Kind::Btrfs => Some(("mkfs.btrfs", &["-q", "-K"])),
            Kind::Block => None,
        }
    }

    /// The mount options plinth applies by default (nosuid,nodev; xfs always nouuid).
    pub fn mount_options(self) -> &'static str {
        match self {
            Kind::Xfs => "nosuid,nodev,nouuid",
            _ => "nosuid,nodev",
        }
    }

    pub fn capability(self) -> csi::VolumeCapability {
        match self.fs() {
            Some(fs) => plinth_tests::mount_cap(fs),
            None => plinth_tests::block_cap(),
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == text)
    }
}
