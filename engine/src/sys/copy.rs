//! Copying images: a reflink clone (FICLONE) where the pool filesystem shares blocks (xfs with
//! reflink, btrfs) — O(1) whatever the size — otherwise a sparse-aware copy that walks the data
//! extents (SEEK_DATA/SEEK_HOLE) with copy_file_range and never writes holes as zeros.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const FICLONE: libc::c_ulong = 0x4004_9409;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("copying {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    Reflink,
    SparseCopy,
}

impl CopyMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Reflink => "reflink",
            CopyMethod::SparseCopy => "sparse-copy",
        }
    }
}

fn reflink(src: &File, dst: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an owned descriptor.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        // ENXIO: no data at or after `offset`.
        return if err.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(err) };
    }
    Ok(Some(rc as u64))
}

fn copy_range(src: &File, dst: &File, mut offset: u64, end: u64) -> std::io::Result<()> {
    while offset < end {
        let mut off_in = offset as libc::loff_t;
        let mut off_out = offset as libc::loff_t;
        let len = (end - offset).min(1 << 30) as usize;
        // SAFETY: both descriptors are open; the kernel reads/writes the two offsets we own.
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, len, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "source shrank during copy"));
        }
        offset += n as u64;
    }
    Ok(())
}

/// Calls `each` with every data extent `[start, end)` within the first `len` bytes of `file`,
/// in order, skipping its holes.
pub fn for_each_data_extent(
    file: &File,
    len: u64,
    mut each: impl FnMut(u64, u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut offset = 0;
    while offset < len {
        let Some(data) = seek(file, offset, libc::SEEK_DATA)? else { break };
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        each(data, hole)?;
        offset = hole;
    }
    Ok(())
}

/// Whether `file` has any data extent at all (a filesystem that cannot tell says yes).
pub fn holds_data(file: &File) -> std::io::Result<bool> {
    Ok(seek(file, 0, libc::SEEK_DATA)?.is_some())
}

fn sparse_copy(src: &File, dst: &File, len: u64) -> std::io::Result<()> {
    for_each_data_extent(src, len, |data, hole| copy_range(src, dst, data, hole))?;
    dst.set_len(len)
}

/// What a copy may do when the filesystem cannot share blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copying {
    /// Only an atomic reflink: the source is live, and a copy that reads it for seconds would
    /// be torn by writes landing during the read.
    ReflinkOnly,
    /// A reflink, else a sparse copy: the source holds still for as long as the copy takes.
    ReflinkOrCopy,
}

/// Copies `from` into the new file `to` (which must not exist), durably.
pub fn copy_image(from: &Path, to: &Path, copying: Copying) -> Result<CopyMethod, CopyError> {
    let src = File::open(from).map_err(|source| CopyError::Open { path: from.to_owned(), source })?;
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|source| CopyError::Open { path: to.to_owned(), source })?;
    let wrap = |source| CopyError::Copy { from: from.to_owned(), to: to.to_owned(), source };
    let method = match reflink(&src, &dst) {
        Ok(()) => CopyMethod::Reflink,
        Err(err) if copying == Copying::ReflinkOnly => return Err(wrap(err)),
        Err(_) => {
            let len = src.metadata().map_err(wrap)?.len();
            sparse_copy(&src, &dst, len).map_err(wrap)?;
            CopyMethod::SparseCopy
        }
    };
    dst.sync_all().map_err(wrap)?;
    Ok(method)
}

/// Whether the filesystem holding `dir` can reflink (xfs with reflink, btrfs): clones one
/// block between two unnamed files in it.
pub fn shares_blocks(dir: &Path) -> bool {
    let probe = || -> std::io::Result<()> {
        let mut src = tempfile::tempfile_in(dir)?;
        std::io::Write::write_all(&mut src, &[0x5a; 4096])?;
        reflink(&src, &tempfile::tempfile_in(dir)?)
    };
    probe().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (src_path, dst_path) = (dir.path().join("src"), dir.path().join("dst"));
        let mut src = File::create(&src_path).unwrap();
        src.set_len(64 << 20).unwrap();
        src.seek(SeekFrom::Start(1 << 20)).unwrap();
        src.write_all(&[7u8; 8192]).unwrap();
        src.seek(SeekFrom::Start(40 << 20)).unwrap();
        src.write_all(b"tail data").unwrap();
        src.sync_all().unwrap();

        copy_image(&src_path, &dst_path, Copying::ReflinkOrCopy).unwrap();
        let (a, b) = (std::fs::read(&src_path).unwrap(), std::fs::read(&dst_path).unwrap());
        assert_eq!(a.len(), b.len());
        assert!(a == b, "contents differ");
        let allocated = std::fs::metadata(&dst_path).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "holes stay holes ({allocated} bytes allocated)");
        assert!(copy_image(&src_path, &dst_path, Copying::ReflinkOrCopy).is_err(), "never overwrites");
        if !shares_blocks(dir.path()) {
            let live = dir.path().join("live");
            assert!(
                copy_image(&src_path, &live, Copying::ReflinkOnly).is_err(),
                "no reflink, no copy of a live source"
            );
        }
    }
}
