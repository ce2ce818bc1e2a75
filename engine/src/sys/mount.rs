//! mount(2)/umount2(2). Callers check the mount table first; these functions only act.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
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
    #[error("{step} for a bind mount of {source_path}")]
    Detached {
        step: &'static str,
        source_path: PathBuf,
        #[source]
        source: std::io::Error,
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

/// Where a bind mount's tree comes from: a path plinth chose (a device node), or a directory
/// held open by fd.
pub enum TreeSource<'a> {
    Path(&'a Path),
    Fd(BorrowedFd<'a>),
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
const MOUNT_ATTR_ATIME_MASK: u64 = 0x70;
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// The per-mount flags of `flags` as mount_setattr(2) attributes (superblock flags do not apply
/// to a bind mount).
fn mount_attributes(flags: MsFlags) -> MountAttr {
    let mut set = 0;
    for (flag, attr) in [
        (MsFlags::MS_RDONLY, MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, MOUNT_ATTR_NOEXEC),
        (MsFlags::MS_NODIRATIME, MOUNT_ATTR_NODIRATIME),
    ] {
        if flags.contains(flag) {
            set |= attr;
        }
    }
    let mut clear = 0;
    if flags.contains(MsFlags::MS_NOATIME) {
        set |= MOUNT_ATTR_NOATIME;
        clear |= MOUNT_ATTR_ATIME_MASK;
    } else if flags.contains(MsFlags::MS_STRICTATIME) {
        set |= MOUNT_ATTR_STRICTATIME;
        clear |= MOUNT_ATTR_ATIME_MASK;
    }
    MountAttr { attr_set: set, attr_clr: clear, propagation: 0, userns_fd: 0 }
}

fn syscall_result(rc: libc::c_long) -> std::io::Result<libc::c_long> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

/// A bind mount done entirely through file descriptors (open_tree, mount_setattr, move_mount):
/// the tree is cloned from `source`, given `flags` while still detached — so it is never
/// visible with weaker flags — and attached onto the directory `target` holds open. No path is
/// resolved after the caller checked it, so no swapped-in symlink can redirect it.
pub fn bind_at(
    source: TreeSource<'_>,
    source_name: &Path,
    target: BorrowedFd<'_>,
    flags: MsFlags,
) -> Result<(), MountError> {
    let wrap = |step: &'static str| {
        move |source: std::io::Error| MountError::Detached { step, source_path: source_name.to_owned(), source }
    };
    let (dirfd, path, at_flags) = match source {
        TreeSource::Path(path) => (libc::AT_FDCWD, path.as_os_str().to_owned(), 0),
        TreeSource::Fd(fd) => (fd.as_raw_fd(), std::ffi::OsString::new(), libc::AT_EMPTY_PATH as libc::c_uint),
    };
    let path =
        std::ffi::CString::new(path.into_encoded_bytes()).map_err(|e| wrap("open_tree")(std::io::Error::other(e)))?;
    // SAFETY: open_tree reads the path string and returns a new descriptor or -1.
    let tree = syscall_result(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dirfd,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | at_flags,
        )
    })
    .map_err(wrap("open_tree"))?;
    // SAFETY: a fresh descriptor this call owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as libc::c_int) };
    let empty = c"";
    let attributes = mount_attributes(flags);
    if attributes.attr_set != 0 || attributes.attr_clr != 0 {
        // SAFETY: mount_setattr reads `attributes`, whose size is passed.
        syscall_result(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH,
                &attributes as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        })
        .map_err(wrap("mount_setattr"))?;
    }
    // SAFETY: move_mount takes two descriptors and two empty paths.
    syscall_result(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
    .map_err(wrap("move_mount"))?;
    Ok(())
}
