//! mount(2)/umount2(2). Callers check the mount table first; these functions only act.

use std::path::{Path, PathBuf};

pub use nix::mount::MsFlags;
use nix::mount::{MntFlags, mount, umount2};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {source_path} ({fs_type}) at {target}")]
    Mount {
        source_path: PathBuf,
        target: PathBuf,
        fs_type: String,
        #[source]
        source: nix::Error,
    },
    #[error("bind-mounting {source_path} at {target}")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("remounting {target} with new flags")]
    Remount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("unmounting {target}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Mounts a filesystem from `device` at `target`.
pub fn mount_filesystem(
    device: &Path,
    target: &Path,
    fs_type: &str,
    flags: MsFlags,
    data: &str,
) -> Result<(), MountError> {
    let data = (!data.is_empty()).then_some(data);
    mount(Some(device), target, Some(fs_type), flags, data).map_err(|source| MountError::Mount {
        source_path: device.to_owned(),
        target: target.to_owned(),
        fs_type: fs_type.to_owned(),
        source,
    })
}

/// Bind-mounts `source` at `target`, then applies per-mount-point `flags` (ro, nosuid, …), which
/// a bind mount only takes on a remount.
pub fn bind(source: &Path, target: &Path, flags: MsFlags) -> Result<(), MountError> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| MountError::Bind {
        source_path: source.to_owned(),
        target: target.to_owned(),
        source: e,
    })?;
    if !flags.is_empty() {
        let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
        if let Err(source) = mount(None::<&str>, target, None::<&str>, remount, None::<&str>) {
            // Never leave a mount with weaker flags than asked for (e.g. writable instead of ro).
            let _ = umount2(target, MntFlags::empty());
            return Err(MountError::Remount { target: target.to_owned(), source });
        }
    }
    Ok(())
}

/// Unmounts `target`. "Not mounted" counts as done.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    match umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(source) => Err(MountError::Unmount { target: target.to_owned(), source }),
    }
}
