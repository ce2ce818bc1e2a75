//! statvfs(3) figures for a mounted filesystem or directory.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Free to unprivileged users (what a pod can still write).
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

impl FsUsage {
    pub fn used_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.free_bytes)
    }
    pub fn used_inodes(&self) -> u64 {
        self.total_inodes.saturating_sub(self.free_inodes)
    }
}

pub fn usage(path: &Path) -> std::io::Result<FsUsage> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let fragment = st.fragment_size() as u64;
    Ok(FsUsage {
        total_bytes: st.blocks() as u64 * fragment,
        free_bytes: st.blocks_free() as u64 * fragment,
        available_bytes: st.blocks_available() as u64 * fragment,
        total_inodes: st.files() as u64,
        free_inodes: st.files_free() as u64,
    })
}
