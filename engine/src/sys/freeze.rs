//! Holding a mounted filesystem still for a copy of its device: freeze (FIFREEZE/FITHAW; the
//! guard always thaws) for copies that take time, a flush (syncfs) before an atomic reflink.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

#[derive(Debug, thiserror::Error)]
#[error("freezing the filesystem at {mount_point}")]
pub struct FreezeError {
    mount_point: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Holds a filesystem frozen; thaws it when dropped, on every path out.
#[derive(Debug)]
pub struct Frozen {
    dir: File,
    mount_point: PathBuf,
}

pub fn freeze(mount_point: &Path) -> Result<Frozen, FreezeError> {
    let wrap = |source| FreezeError { mount_point: mount_point.to_owned(), source };
    let dir = File::open(mount_point).map_err(wrap)?;
    // SAFETY: FIFREEZE takes no meaningful argument.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) };
    if rc < 0 {
        return Err(wrap(std::io::Error::last_os_error()));
    }
    Ok(Frozen { dir, mount_point: mount_point.to_owned() })
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: FITHAW takes no meaningful argument.
        let rc = unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW, 0) };
        if rc < 0 {
            tracing::error!(mount_point = %self.mount_point.display(), error = %std::io::Error::last_os_error(),
                "thawing failed");
        }
    }
}

/// Thaws the filesystem at `mount_point` if it is frozen (left so by a process that died holding
/// a [`Frozen`]). Returns whether it was frozen.
pub fn thaw(mount_point: &Path) -> Result<bool, FreezeError> {
    let wrap = |source| FreezeError { mount_point: mount_point.to_owned(), source };
    let dir = File::open(mount_point).map_err(wrap)?;
    // SAFETY: FITHAW takes no meaningful argument.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    // EINVAL: it was not frozen.
    if err.raw_os_error() == Some(libc::EINVAL) { Ok(false) } else { Err(wrap(err)) }
}

/// Flushes the filesystem mounted at `mount_point`: dirty data written back, journal committed.
pub fn sync(mount_point: &Path) -> std::io::Result<()> {
    let dir = File::open(mount_point)?;
    nix::unistd::syncfs(&dir).map_err(std::io::Error::from)
}
