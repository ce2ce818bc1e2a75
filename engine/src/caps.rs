//! CSI volume capabilities in plinth's terms, and which of them plinth can serve.

use plinth_proto::csi_v1::{VolumeCapability, volume_capability};

use crate::error::{Error, Result};
use crate::model::{FsType, Layout};

type Mode = volume_capability::access_mode::Mode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    pub fn read_only(self) -> bool {
        self == AccessMode::SingleNodeReaderOnly
    }
    /// Modes that allow only one writer (so a second publish target is refused).
    pub fn single_writer(self) -> bool {
        self == AccessMode::SingleNodeSingleWriter
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    Block,
    Mount { fs_type: Option<FsType>, mount_flags: Vec<String>, volume_mount_group: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access_type: AccessType,
    pub mode: AccessMode,
}

impl Capability {
    pub fn parse(cap: &VolumeCapability) -> Result<Self> {
        let access_type = match &cap.access_type {
            None => {
                return Err(Error::InvalidArgument("volume capability needs an access type (mount or block)".into()));
            }
            Some(volume_capability::AccessType::Block(_)) => AccessType::Block,
            Some(volume_capability::AccessType::Mount(m)) => AccessType::Mount {
                fs_type: if m.fs_type.is_empty() { None } else { Some(FsType::parse(&m.fs_type)?) },
                mount_flags: m.mount_flags.clone(),
                volume_mount_group: m.volume_mount_group.clone(),
            },
        };
        let raw_mode = cap
            .access_mode
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("volume capability needs an access mode".into()))?
            .mode;
        let mode = match Mode::try_from(raw_mode) {
            Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
            Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
            Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
            Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
            Ok(mode @ (Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter)) => {
                return Err(Error::InvalidArgument(format!(
                    "access mode {} is not supported: a plinth volume lives on one node's disk \
                     (use a SINGLE_NODE_* mode, i.e. ReadWriteOnce or ReadWriteOncePod)",
                    mode.as_str_name()
                )));
            }
            Ok(Mode::Unknown) | Err(_) => {
                return Err(Error::InvalidArgument(format!("access mode {raw_mode} is unknown")));
            }
        };
        Ok(Capability { access_type, mode })
    }

    pub fn parse_all(caps: &[VolumeCapability]) -> Result<Vec<Self>> {
        if caps.is_empty() {
            return Err(Error::InvalidArgument("volume_capabilities is required".into()));
        }
        caps.iter().map(Capability::parse).collect()
    }

    /// Whether a volume with `layout` can be used this way (a block volume is never formatted;
    /// a filesystem volume is only mounted with its own filesystem).
    pub fn check_layout(&self, layout: Layout) -> Result<()> {
        match (&self.access_type, layout) {
            (AccessType::Block, _) => Ok(()),
            (AccessType::Mount { .. }, Layout::Block) => Err(Error::InvalidArgument(
                "this is a block volume; it cannot be mounted as a filesystem (plinth never formats a block volume)"
                    .into(),
            )),
            (AccessType::Mount { fs_type: Some(asked), .. }, Layout::Filesystem { fs_type }) if *asked != fs_type => {
                Err(Error::InvalidArgument(format!(
                    "volume has a {} filesystem, capability asks for {}",
                    fs_type.as_str(),
                    asked.as_str()
                )))
            }
            (AccessType::Mount { .. }, Layout::Filesystem { .. }) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plinth_proto::csi_v1::volume_capability::{AccessMode as ProtoMode, BlockVolume, MountVolume};

    fn cap(access_type: Option<volume_capability::AccessType>, mode: Mode) -> VolumeCapability {
        VolumeCapability { access_type, access_mode: Some(ProtoMode { mode: mode as i32 }) }
    }

    fn mount(fs: &str) -> Option<volume_capability::AccessType> {
        Some(volume_capability::AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }))
    }

    #[test]
    fn parses_supported_capabilities() {
        let c = Capability::parse(&cap(mount("xfs"), Mode::SingleNodeWriter)).unwrap();
        assert_eq!(c.mode, AccessMode::SingleNodeWriter);
        assert!(matches!(c.access_type, AccessType::Mount { fs_type: Some(FsType::Xfs), .. }));
        let b = Capability::parse(&cap(
            Some(volume_capability::AccessType::Block(BlockVolume {})),
            Mode::SingleNodeReaderOnly,
        ))
        .unwrap();
        assert!(b.mode.read_only());
        assert!(b.check_layout(Layout::Block).is_ok());
    }

    #[test]
    fn refuses_what_plinth_cannot_serve() {
        for bad in [
            cap(mount("ext4"), Mode::MultiNodeMultiWriter),
            cap(mount("ext4"), Mode::Unknown),
            cap(None, Mode::SingleNodeWriter),
            cap(mount("zfs"), Mode::SingleNodeWriter),
            VolumeCapability { access_type: mount(""), access_mode: None },
        ] {
            assert!(matches!(Capability::parse(&bad), Err(Error::InvalidArgument(_))), "{bad:?}");
        }
        assert!(Capability::parse_all(&[]).is_err());
        let c = Capability::parse(&cap(mount("xfs"), Mode::SingleNodeWriter)).unwrap();
        assert!(c.check_layout(Layout::Filesystem { fs_type: FsType::Ext4 }).is_err());
        assert!(c.check_layout(Layout::Block).is_err());
    }
}
