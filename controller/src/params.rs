//! StorageClass parameters, as every path receives them: CreateVolume's `parameters` (local
//! controller, sidecar controller), a StorageClass's `parameters` (plinth's own claim reconciler)
//! and the CLI's `volume create` (which writes them). One parser, one set of keys.

use std::collections::HashMap;

use plinth_engine::Error;
use plinth_engine::model::{
    FsType, PARAM_FS_TYPE, PARAM_MKFS_OPTIONS, PARAM_PROVISIONING, Provisioning, VolumeParameters,
};

/// The StorageClass key Kubernetes reserves for the filesystem. external-provisioner moves it
/// into the capability's `fs_type` before calling CreateVolume; plinth's own reconciler reads
/// the class directly, so it finds it here.
pub const PARAM_CSI_FS_TYPE: &str = "csi.storage.k8s.io/fstype";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClassParameters {
    /// `fsType` or `csi.storage.k8s.io/fstype`; `None`: the capability decides (default ext4).
    pub fs_type: Option<FsType>,
    pub provisioning: Provisioning,
    /// Raw `mkfsOptions`; validated against the filesystem when the image is made.
    pub mkfs_options: Option<String>,
}

impl ClassParameters {
    /// Unknown keys are INVALID_ARGUMENT; other `csi.storage.k8s.io/` keys are informational.
    pub fn parse<'a>(params: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Self, Error> {
        let mut reserved_fs = None;
        let mut rest = Vec::new();
        for (key, value) in params {
            if key == PARAM_CSI_FS_TYPE {
                if !value.is_empty() {
                    reserved_fs = Some(FsType::parse(value)?);
                }
            } else {
                rest.push((key, value));
            }
        }
        let VolumeParameters { fs_type, provisioning, mkfs_options } = VolumeParameters::parse(rest)?;
        let fs_type = match (fs_type, reserved_fs) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::InvalidArgument(format!(
                    "parameters {PARAM_FS_TYPE}={} and {PARAM_CSI_FS_TYPE}={} disagree",
                    a.as_str(),
                    b.as_str()
                )));
            }
            (a, b) => a.or(b),
        };
        Ok(Self { fs_type, provisioning, mkfs_options })
    }

    /// What the engine takes.
    pub fn volume_parameters(&self) -> VolumeParameters {
        VolumeParameters {
            fs_type: self.fs_type,
            provisioning: self.provisioning,
            mkfs_options: self.mkfs_options.clone(),
        }
    }

    /// The parameters a CreateVolume carries to ask for this (what the CLI sends).
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([(PARAM_PROVISIONING.to_owned(), self.provisioning.as_str().to_owned())]);
        if let Some(fs) = self.fs_type {
            map.insert(PARAM_FS_TYPE.to_owned(), fs.as_str().to_owned());
        }
        if let Some(options) = &self.mkfs_options {
            map.insert(PARAM_MKFS_OPTIONS.to_owned(), options.clone());
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<ClassParameters, Error> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ClassParameters::parse(&map)
    }

    #[test]
    fn reads_both_filesystem_keys() {
        assert_eq!(parse(&[("csi.storage.k8s.io/fstype", "xfs")]).unwrap().fs_type, Some(FsType::Xfs));
        assert_eq!(parse(&[("fsType", "btrfs")]).unwrap().fs_type, Some(FsType::Btrfs));
        assert_eq!(
            parse(&[("fsType", "xfs"), ("csi.storage.k8s.io/fstype", "xfs")]).unwrap().fs_type,
            Some(FsType::Xfs)
        );
        assert_eq!(parse(&[("csi.storage.k8s.io/fstype", "")]).unwrap().fs_type, None);
        let err = parse(&[("fsType", "xfs"), ("csi.storage.k8s.io/fstype", "ext4")]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn refuses_what_plinth_does_not_take() {
        for bad in [
            &[("provisioning", "fat")][..],
            &[("csi.storage.k8s.io/fstype", "ntfs")],
            &[("color", "blue")],
            &[("fsType", "ext3")],
        ] {
            assert!(matches!(parse(bad), Err(Error::InvalidArgument(_))), "{bad:?}");
        }
        let informational = parse(&[("csi.storage.k8s.io/pvc/name", "data"), ("provisioning", "thick")]).unwrap();
        assert_eq!(
            informational,
            ClassParameters { fs_type: None, provisioning: Provisioning::Thick, mkfs_options: None }
        );
    }

    #[test]
    fn what_the_cli_writes_parses_back() {
        let wanted =
            ClassParameters { fs_type: Some(FsType::Xfs), provisioning: Provisioning::Thick, mkfs_options: None };
        assert_eq!(ClassParameters::parse(&wanted.to_map()).unwrap(), wanted);
        let with_options = ClassParameters { mkfs_options: Some("-m reflink=1".into()), ..wanted };
        assert_eq!(ClassParameters::parse(&with_options.to_map()).unwrap(), with_options);
        assert_eq!(with_options.volume_parameters().mkfs_options.as_deref(), Some("-m reflink=1"));
    }
}
