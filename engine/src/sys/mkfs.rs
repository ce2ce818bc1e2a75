//! Filesystem probing (blkid) and creation (mkfs.*). The only places plinth runs other programs;
//! arguments are fixed strings and device paths plinth chose, never user strings through a shell.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::model::FsType;

#[derive(Debug, thiserror::Error)]
pub enum MkfsError {
    #[error("running {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {device} failed ({status}): {stderr}")]
    Failed { program: &'static str, device: PathBuf, status: String, stderr: String },
    #[error("looking for data in {image}")]
    Extents {
        image: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What is on a device, as far as it matters before formatting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No filesystem, partition table or other signature: safe to format.
    Blank,
    /// A filesystem of type `fs`; `block_size` is what blkid reports (ext4's block size, xfs's
    /// sector size): below the device's logical block size, it cannot be mounted there.
    Filesystem { fs: String, block_size: Option<u32> },
    /// Some other signature (partition table, RAID member, …): never format over it.
    Other(String),
}

fn run(program: &'static str, args: &[&std::ffi::OsStr]) -> Result<Output, MkfsError> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| MkfsError::Spawn { program, source })
}

fn failure(program: &'static str, device: &Path, output: &Output) -> MkfsError {
    MkfsError::Failed {
        program,
        device: device.to_owned(),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    }
}

pub(crate) fn parse_blkid_export(text: &str) -> Probe {
    let value =
        |key: &str| text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('='))).map(str::to_owned);
    match (value("TYPE"), value("PTTYPE"), value("USAGE")) {
        (Some(fs), _, usage) if usage.as_deref().is_none_or(|u| u == "filesystem") => {
            Probe::Filesystem { fs, block_size: value("BLOCK_SIZE").and_then(|b| b.parse().ok()) }
        }
        (Some(other), _, _) => Probe::Other(other),
        (None, Some(table), _) => Probe::Other(format!("{table} partition table")),
        (None, None, _) if text.trim().is_empty() => Probe::Blank,
        (None, None, _) => Probe::Other(text.trim().replace('\n', " ")),
    }
}

/// Whether any byte of `image` was ever written: its first data extent (SEEK_DATA), if any. A
/// file that is all holes reads as zeros, so it holds no signature of any kind. A filesystem
/// that cannot tell says the whole file is data.
pub fn holds_data(image: &Path) -> std::io::Result<bool> {
    crate::sys::copy::holds_data(&std::fs::File::open(image)?)
}

/// What is on `device`, the loop device of `image`. An image that holds no data at all is
/// blank without asking blkid, whose low-level probe reads dozens of places on the device
/// (7 ms on a blank 1 GiB volume here, a quarter of a first stage); any data, and blkid looks.
pub fn probe(device: &Path, image: &Path) -> Result<Probe, MkfsError> {
    if !holds_data(image).map_err(|source| MkfsError::Extents { image: image.to_owned(), source })? {
        return Ok(Probe::Blank);
    }
    blkid(device)
}

/// Low-level probe of `device` by blkid (bypasses its cache).
fn blkid(device: &Path) -> Result<Probe, MkfsError> {
    let output = run("blkid", &["-p".as_ref(), "-o".as_ref(), "export".as_ref(), device.as_os_str()])?;
    match output.status.code() {
        Some(0) => Ok(parse_blkid_export(&String::from_utf8_lossy(&output.stdout))),
        // blkid's documented "nothing detected" exit status.
        Some(2) => Ok(Probe::Blank),
        _ => Err(failure("blkid", device, &output)),
    }
}

/// The programs a filesystem needs on this node, and the Debian package that ships them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsTools {
    pub format: &'static str,
    pub grow: &'static [&'static str],
    pub package: &'static str,
}

/// Probing (before any format) needs blkid.
pub const PROBE_TOOL: (&str, &str) = ("blkid", "util-linux");

pub fn tools(fs: FsType) -> FsTools {
    match fs {
        FsType::Ext4 => FsTools { format: "mkfs.ext4", grow: &["resize2fs", "e2fsck"], package: "e2fsprogs" },
        FsType::Xfs => FsTools { format: "mkfs.xfs", grow: &["xfs_growfs"], package: "xfsprogs" },
        FsType::Btrfs => FsTools { format: "mkfs.btrfs", grow: &["btrfs"], package: "btrfs-progs" },
    }
}

/// Whether `program` is an executable file in one of `PATH`'s directories.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Arguments that keep mkfs fast on large images and keep thick images thick: no discard (which
/// would punch the preallocation out again) and lazy inode table / journal initialisation.
fn mkfs_args(fs: FsType) -> (&'static str, &'static [&'static str]) {
    match fs {
        FsType::Ext4 => ("mkfs.ext4", &["-q", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]),
        // Without -f, mkfs.xfs and mkfs.btrfs refuse to overwrite an existing signature: a second guard.
        FsType::Xfs => ("mkfs.xfs", &["-q", "-K"]),
        FsType::Btrfs => ("mkfs.btrfs", &["-q", "-K"]),
    }
}

/// Formats a device that [`probe`] reported as blank. `extra` are pre-validated mkfs options.
pub fn make_filesystem(device: &Path, fs: FsType, extra: &[String]) -> Result<(), MkfsError> {
    let (program, fixed) = mkfs_args(fs);
    let mut args: Vec<&std::ffi::OsStr> = fixed.iter().map(|a| a.as_ref()).collect();
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(a.as_str())));
    args.push(device.as_os_str());
    let output = run(program, &args)?;
    if !output.status.success() {
        return Err(failure(program, device, &output));
    }
    Ok(())
}

/// Grows an unmounted ext4 filesystem: a preen-mode check first (resize2fs insists on one),
/// which fixes only what is safe to fix and fails otherwise. Needs no CAP_SYS_RESOURCE, unlike
/// ext4's online resize.
pub fn grow_unmounted_ext4(device: &Path) -> Result<(), MkfsError> {
    let output = run("e2fsck", &["-f".as_ref(), "-p".as_ref(), device.as_os_str()])?;
    // 0: clean; 1: errors corrected. Anything else needs a person.
    if !matches!(output.status.code(), Some(0 | 1)) {
        return Err(failure("e2fsck", device, &output));
    }
    let output = run("resize2fs", &[device.as_os_str()])?;
    if !output.status.success() {
        return Err(failure("resize2fs", device, &output));
    }
    Ok(())
}

/// Grows a mounted filesystem to fill its (already enlarged) device. Idempotent.
pub fn grow_filesystem(device: &Path, mount_point: &Path, fs: FsType) -> Result<(), MkfsError> {
    let (program, args): (&'static str, Vec<&std::ffi::OsStr>) = match fs {
        FsType::Ext4 => ("resize2fs", vec![device.as_os_str()]),
        FsType::Xfs => ("xfs_growfs", vec![mount_point.as_os_str()]),
        FsType::Btrfs => {
            ("btrfs", vec!["filesystem".as_ref(), "resize".as_ref(), "max".as_ref(), mount_point.as_os_str()])
        }
    };
    let output = run(program, &args)?;
    if !output.status.success() {
        return Err(failure(program, device, &output));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_holds_data_once_a_byte_is_written_anywhere() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let mut image = std::fs::File::create(&path).unwrap();
        image.set_len(64 << 20).unwrap();
        assert!(!holds_data(&path).unwrap(), "all holes");
        // One sector near the end, where RAID and other metadata superblocks live.
        image.seek(SeekFrom::Start((64 << 20) - 4096)).unwrap();
        image.write_all(&[0xa5; 512]).unwrap();
        assert!(holds_data(&path).unwrap(), "written, not yet on disk");
        image.sync_all().unwrap();
        assert!(holds_data(&path).unwrap(), "written and on disk");
        assert!(holds_data(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn classifies_blkid_output() {
        assert_eq!(parse_blkid_export(""), Probe::Blank);
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/loop0\nUUID=abc\nBLOCK_SIZE=512\nTYPE=xfs\nUSAGE=filesystem\n"),
            Probe::Filesystem { fs: "xfs".into(), block_size: Some(512) }
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/loop0\nTYPE=ext4\n"),
            Probe::Filesystem { fs: "ext4".into(), block_size: None }
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/loop0\nPTUUID=1\nPTTYPE=gpt\n"),
            Probe::Other("gpt partition table".into())
        );
        assert_eq!(
            parse_blkid_export("TYPE=linux_raid_member\nUSAGE=raid\n"),
            Probe::Other("linux_raid_member".into())
        );
    }

    #[test]
    fn finds_programs_on_path_only_when_executable() {
        assert!(on_path("sh"));
        assert!(!on_path("plinth-no-such-program"));
        assert_eq!(tools(FsType::Xfs).package, "xfsprogs");
        assert!(tools(FsType::Ext4).grow.contains(&"e2fsck"));
    }

    #[test]
    fn mkfs_never_discards() {
        for fs in [FsType::Ext4, FsType::Xfs, FsType::Btrfs] {
            let (_, args) = mkfs_args(fs);
            let joined = args.join(" ");
            assert!(joined.contains("nodiscard") || joined.contains("-K"), "{fs:?}: {joined}");
            assert!(!args.contains(&"-f") && !args.contains(&"-F"), "{fs:?} must not force");
        }
    }
}
