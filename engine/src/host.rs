//! The machine behind one narrow interface: everything the engine asks of the kernel and of the
//! filesystem tools goes through [`Host`], so the engine's decisions read as intent and can be
//! tested without root against a recording double (`host::fake`, test builds only).
//!
//! [`SystemHost`] is the real implementation: thin delegation to `sys/`, the only code that
//! issues ioctls, mount(2), reads the mount table or sysfs, or runs blkid/mkfs/resize tools.
//! Image files in the pool are plain files and stay with `pool` (they need no privilege).

use std::path::{Path, PathBuf};

use crate::model::FsType;
use crate::paths::Pinned;
use crate::sys::freeze::FreezeError;
use crate::sys::loopdev::{Backing, LoopDevice, LoopError};
use crate::sys::mkfs::{MkfsError, Probe};
use crate::sys::mount::{MountError, MsFlags};
use crate::sys::mountinfo::{MountInfoError, MountTable};
use crate::sys::statfs::FsUsage;

#[cfg(any(test, feature = "fake-host"))]
pub mod fake;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    MountTable(#[from] MountInfoError),
    #[error(transparent)]
    Mkfs(#[from] MkfsError),
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type HostResult<T> = std::result::Result<T, HostError>;

/// What a bind mount shows at its target.
#[derive(Debug, Clone, Copy)]
pub enum BindSource<'a> {
    /// A device node plinth chose (`/dev/loopN`): raw block access.
    Device(&'a Path),
    /// A directory a CO named (the staging mount), pinned like a target.
    Dir(&'a Pinned),
}

/// A filesystem held frozen (FIFREEZE) until dropped; dropping thaws it, on every path.
pub trait FrozenFs: Send + std::fmt::Debug {}

/// What the engine needs from the machine. Implementations act; they do not decide — callers
/// look (mount table, loop devices, probe) before they act.
pub trait Host: Send + Sync + std::fmt::Debug {
    /// Every loop device bound to a backing file, with that file (identified by inode).
    fn loop_devices(&self) -> HostResult<Vec<(LoopDevice, Backing)>>;
    /// Attaches `image` to a free loop device with direct I/O and `block_size`-byte logical
    /// blocks (4096, or 512 for volumes formatted before plinth fixed the geometry).
    fn attach_loop(&self, image: &Path, read_only: bool, block_size: u32) -> HostResult<LoopDevice>;
    /// Detaches; a device already unbound counts as detached.
    fn detach_loop(&self, device: LoopDevice) -> HostResult<()>;
    fn loop_size(&self, device: LoopDevice) -> HostResult<u64>;
    /// Makes the device pick up its grown backing file.
    fn refresh_loop_capacity(&self, device: LoopDevice) -> HostResult<()>;
    /// Whether the kernel really serves the device with direct I/O.
    fn loop_direct_io(&self, device: LoopDevice) -> bool;
    /// Whether loop devices can be attached at all.
    fn loop_control_available(&self) -> bool;

    fn mount_table(&self) -> HostResult<MountTable>;
    /// Mounts onto the pinned target (the inode that was checked, whatever its path shows now).
    fn mount_filesystem(
        &self,
        device: &Path,
        target: &Pinned,
        fs: FsType,
        flags: MsFlags,
        data: &str,
    ) -> HostResult<()>;
    /// Bind mount with per-mount `flags` applied (never left mounted with weaker flags).
    fn bind_mount(&self, source: BindSource<'_>, target: &Pinned, flags: MsFlags) -> HostResult<()>;
    /// Unmounts; "not mounted" counts as done.
    fn unmount(&self, target: &Path) -> HostResult<()>;

    /// What is on `device`, the loop device of `image`: blank when the image holds no data at
    /// all, else what blkid finds (bypassing its cache).
    fn probe(&self, device: &Path, image: &Path) -> HostResult<Probe>;
    /// Formats a device `probe` reported blank; `extra` are validated mkfs options.
    fn make_filesystem(&self, device: &Path, fs: FsType, extra: &[String]) -> HostResult<()>;
    /// e2fsck -p then resize2fs on an unmounted ext4 filesystem.
    fn grow_unmounted_ext4(&self, device: &Path) -> HostResult<()>;
    /// Grows a mounted filesystem to fill its device.
    fn grow_filesystem(&self, device: &Path, mount_point: &Path, fs: FsType) -> HostResult<()>;
    fn freeze(&self, mount_point: &Path) -> HostResult<Box<dyn FrozenFs>>;
    /// Writes back the mounted filesystem's dirty data and commits its journal (syncfs(2)).
    fn sync_filesystem(&self, mount_point: &Path) -> HostResult<()>;
    /// Thaws a filesystem a dead process left frozen; whether it was frozen.
    fn thaw(&self, mount_point: &Path) -> HostResult<bool>;
    fn statfs(&self, path: &Path) -> HostResult<FsUsage>;
    /// Errors a mounted filesystem recorded (ext4's sysfs `errors_count`); `None` when unknown.
    fn filesystem_errors(&self, device: LoopDevice, fs: FsType) -> Option<u64>;
    /// Whether a program plinth runs (blkid, mkfs.*, growth tools) is installed.
    fn program_available(&self, program: &str) -> bool;
}

/// The real machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemHost;

impl FrozenFs for crate::sys::freeze::Frozen {}

impl Host for SystemHost {
    fn loop_devices(&self) -> HostResult<Vec<(LoopDevice, Backing)>> {
        Ok(crate::sys::loopdev::attached_devices()?)
    }
    fn attach_loop(&self, image: &Path, read_only: bool, block_size: u32) -> HostResult<LoopDevice> {
        Ok(crate::sys::loopdev::attach_with_block_size(image, read_only, block_size)?)
    }
    fn detach_loop(&self, device: LoopDevice) -> HostResult<()> {
        Ok(crate::sys::loopdev::detach(device)?)
    }
    fn loop_size(&self, device: LoopDevice) -> HostResult<u64> {
        Ok(device.size_bytes()?)
    }
    fn refresh_loop_capacity(&self, device: LoopDevice) -> HostResult<()> {
        Ok(device.refresh_capacity()?)
    }
    fn loop_direct_io(&self, device: LoopDevice) -> bool {
        device.direct_io()
    }
    fn loop_control_available(&self) -> bool {
        crate::sys::loopdev::control_available()
    }

    fn mount_table(&self) -> HostResult<MountTable> {
        Ok(MountTable::read()?)
    }
    fn mount_filesystem(
        &self,
        device: &Path,
        target: &Pinned,
        fs: FsType,
        flags: MsFlags,
        data: &str,
    ) -> HostResult<()> {
        Ok(crate::sys::mount::mount_filesystem(device, &target.fd_path(), fs.as_str(), flags, data)?)
    }
    fn bind_mount(&self, source: BindSource<'_>, target: &Pinned, flags: MsFlags) -> HostResult<()> {
        use crate::sys::mount::{TreeSource, bind_at};
        let (tree, name) = match source {
            BindSource::Device(device) => (TreeSource::Path(device), device),
            BindSource::Dir(dir) => (TreeSource::Fd(dir.fd()), dir.path()),
        };
        Ok(bind_at(tree, name, target.fd(), flags)?)
    }
    fn unmount(&self, target: &Path) -> HostResult<()> {
        Ok(crate::sys::mount::unmount(target)?)
    }

    fn probe(&self, device: &Path, image: &Path) -> HostResult<Probe> {
        Ok(crate::sys::mkfs::probe(device, image)?)
    }
    fn make_filesystem(&self, device: &Path, fs: FsType, extra: &[String]) -> HostResult<()> {
        Ok(crate::sys::mkfs::make_filesystem(device, fs, extra)?)
    }
    fn grow_unmounted_ext4(&self, device: &Path) -> HostResult<()> {
        Ok(crate::sys::mkfs::grow_unmounted_ext4(device)?)
    }
    fn grow_filesystem(&self, device: &Path, mount_point: &Path, fs: FsType) -> HostResult<()> {
        Ok(crate::sys::mkfs::grow_filesystem(device, mount_point, fs)?)
    }
    fn freeze(&self, mount_point: &Path) -> HostResult<Box<dyn FrozenFs>> {
        Ok(Box::new(crate::sys::freeze::freeze(mount_point)?))
    }
    fn sync_filesystem(&self, mount_point: &Path) -> HostResult<()> {
        crate::sys::freeze::sync(mount_point).map_err(|source| HostError::Io {
            what: "syncfs",
            path: mount_point.to_owned(),
            source,
        })
    }
    fn thaw(&self, mount_point: &Path) -> HostResult<bool> {
        Ok(crate::sys::freeze::thaw(mount_point)?)
    }
    fn statfs(&self, path: &Path) -> HostResult<FsUsage> {
        crate::sys::statfs::usage(path).map_err(|source| HostError::Io {
            what: "statfs",
            path: path.to_owned(),
            source,
        })
    }
    fn filesystem_errors(&self, device: LoopDevice, fs: FsType) -> Option<u64> {
        match fs {
            FsType::Ext4 => crate::sys::fserrors::ext4_error_count(device),
            FsType::Xfs | FsType::Btrfs => None,
        }
    }
    fn program_available(&self, program: &str) -> bool {
        crate::sys::mkfs::on_path(program)
    }
}
