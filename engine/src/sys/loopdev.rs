//! Loop devices through the kernel's ioctl interface (loop(4)): no `losetup` processes.
//!
//! Invariant: an image is attached to at most one loop device by plinth. Callers look the image up
//! (by [`Backing::is`]) before calling [`attach`], under the volume's operation lock.
//!
//! An attachment is identified by its backing file's device and inode (LOOP_GET_STATUS64), never
//! by the path sysfs shows: that path is resolved against the reader's mounts, so a plinth in a
//! new container (after its pod restarted) sees its predecessor's attachments under a different
//! path (`/pool/vol-….img` instead of `/var/lib/plinth/pool/vol-….img`) — matching paths missed
//! them, attached the image a second time and leaked the first device.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CONTROL: &str = "/dev/loop-control";
const SYS_BLOCK: &str = "/sys/block";
const PROC_PARTITIONS: &str = "/proc/partitions";

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Every plinth loop device presents 4096-byte logical blocks, whatever backs it. The kernel
/// otherwise derives the size from the backing file's direct-I/O alignment, which changes under a
/// filesystem's feet (a reflinked file on xfs needs 4096-aligned direct I/O, a fresh one 512):
/// a filesystem made with 1 KiB blocks then no longer mounts. 4096 also keeps direct I/O aligned.
pub const LOGICAL_BLOCK_SIZE: u32 = 4096;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} on {device}")]
    Ioctl {
        op: &'static str,
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading loop devices from {SYS_BLOCK}")]
    Sysfs(#[source] std::io::Error),
    #[error("no free loop device after {attempts} attempts (each was taken by someone else)")]
    NoneFree { attempts: u32 },
}

/// `/dev/loopN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopDevice {
    pub number: u32,
}

impl LoopDevice {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.number))
    }

    fn sysfs(&self, leaf: &str) -> PathBuf {
        PathBuf::from(format!("{SYS_BLOCK}/loop{}/{leaf}", self.number))
    }

    /// Parses "/dev/loopN".
    pub fn from_path(path: &Path) -> Option<Self> {
        let number = path.to_str()?.strip_prefix("/dev/loop")?.parse().ok()?;
        Some(Self { number })
    }

    /// The (major, minor) device number, as mountinfo shows it.
    pub fn dev_numbers(&self) -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(self.sysfs("dev")).ok()?;
        let (major, minor) = text.trim().split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    }

    /// Whether the kernel actually serves this device with direct I/O (it silently falls back to
    /// buffered I/O when the backing filesystem cannot do it).
    pub fn direct_io(&self) -> bool {
        std::fs::read_to_string(self.sysfs("loop/dio")).is_ok_and(|v| v.trim() == "1")
    }

    pub fn backing_file(&self) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.sysfs("loop/backing_file")).ok()?;
        Some(PathBuf::from(text.trim_end_matches('\n')))
    }

    pub fn size_bytes(&self) -> Result<u64, LoopError> {
        let file = open_device(&self.path(), false)?;
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        check(rc, "BLKGETSIZE64", &self.path())?;
        Ok(size)
    }

    /// Makes the device pick up a grown backing file (LOOP_SET_CAPACITY).
    pub fn refresh_capacity(&self) -> Result<(), LoopError> {
        let file = open_device(&self.path(), true)?;
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_SET_CAPACITY, 0) };
        check(rc, "LOOP_SET_CAPACITY", &self.path())
    }
}

fn open_device(path: &Path, write: bool) -> Result<File, LoopError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|source| LoopError::Open { path: path.to_owned(), source })
}

fn check(rc: libc::c_int, op: &'static str, device: &Path) -> Result<(), LoopError> {
    if rc < 0 {
        Err(LoopError::Ioctl { op, device: device.to_owned(), source: std::io::Error::last_os_error() })
    } else {
        Ok(())
    }
}

/// The file behind a loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// As sysfs shows it to this process (relative to its mounts; may end in " (deleted)").
    pub path: PathBuf,
    /// The backing file's filesystem (major, minor) and inode: what identifies it.
    pub dev: (u32, u32),
    pub inode: u64,
}

impl Backing {
    /// Whether this is the file `metadata` describes.
    pub fn is(&self, metadata: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        let dev = metadata.dev();
        self.inode == metadata.ino() && self.dev == (libc::major(dev), libc::minor(dev))
    }

    /// Whether the backing file was deleted while attached.
    pub fn deleted(&self) -> bool {
        self.path.to_string_lossy().ends_with(" (deleted)")
    }
}

/// The backing file of a bound device (LOOP_GET_STATUS64); `None` when it is not bound.
fn backing_of(device: LoopDevice) -> Result<Option<Backing>, LoopError> {
    let Some(path) = device.backing_file() else { return Ok(None) };
    let file = match open_device(&device.path(), false) {
        Ok(file) => file,
        // Gone between listing and opening.
        Err(LoopError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // SAFETY: LoopInfo64 mirrors `struct loop_info64`; all-zero bytes are a valid value.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_GET_STATUS64, &mut info as *mut LoopInfo64) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        // ENXIO: unbound since it was listed.
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(LoopError::Ioctl { op: "LOOP_GET_STATUS64", device: device.path(), source: err });
    }
    // The kernel encodes the device number as huge_encode_dev: minor low byte, major, minor rest.
    let dev = info.lo_device;
    let (major, minor) = (((dev >> 8) & 0xfff) as u32, ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32);
    Ok(Some(Backing { path, dev: (major, minor), inode: info.lo_inode }))
}

/// Every loop device currently bound to a backing file.
///
/// The candidates come from `/proc/partitions`, which lists only block devices with a nonzero
/// capacity: a loop device that is not bound has none. The kernel keeps every loop device it
/// ever created (a node that staged many volumes has hundreds), and asking each of them, as a
/// walk of `/sys/block` does, cost about 2 ms per lookup on a node with 400 of them, several
/// lookups per volume operation. A binding of an empty file is not listed; plinth's images are
/// never empty.
pub fn attached_devices() -> Result<Vec<(LoopDevice, Backing)>, LoopError> {
    let candidates = match std::fs::read_to_string(PROC_PARTITIONS) {
        Ok(table) => loop_numbers_in_partitions(&table),
        Err(_) => every_loop_device()?,
    };
    let mut found = Vec::new();
    for number in candidates {
        let device = LoopDevice { number };
        if let Some(backing) = backing_of(device)? {
            found.push((device, backing));
        }
    }
    found.sort_by_key(|(d, _)| d.number);
    Ok(found)
}

/// The loop devices (not their partitions) named in `/proc/partitions`.
fn loop_numbers_in_partitions(table: &str) -> Vec<u32> {
    table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|name| name.strip_prefix("loop")?.parse().ok())
        .collect()
}

/// Every loop device the kernel has, bound or not (when `/proc/partitions` cannot be read).
fn every_loop_device() -> Result<Vec<u32>, LoopError> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(SYS_BLOCK).map_err(LoopError::Sysfs)? {
        let name = entry.map_err(LoopError::Sysfs)?.file_name();
        if let Some(number) = name.to_str().and_then(|n| n.strip_prefix("loop")).and_then(|n| n.parse().ok()) {
            numbers.push(number);
        }
    }
    Ok(numbers)
}

/// Attaches `image` to a free loop device with LOOP_CONFIGURE, with direct I/O requested.
pub fn attach(image: &Path, read_only: bool) -> Result<LoopDevice, LoopError> {
    attach_with_block_size(image, read_only, LOGICAL_BLOCK_SIZE)
}

/// [`attach`] with another logical block size: 512 for volumes formatted before plinth fixed
/// the geometry at 4096 (their filesystems use blocks or sectors a 4096 device cannot address).
pub fn attach_with_block_size(image: &Path, read_only: bool, block_size: u32) -> Result<LoopDevice, LoopError> {
    let backing = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(image)
        .map_err(|source| LoopError::Open { path: image.to_owned(), source })?;
    let control = open_device(Path::new(LOOP_CONTROL), true)?;
    const ATTEMPTS: u32 = 16;
    for _ in 0..ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        check(number, "LOOP_CTL_GET_FREE", Path::new(LOOP_CONTROL))?;
        let device = LoopDevice { number: number as u32 };
        let device_file = open_device(&device.path(), !read_only)?;
        let mut config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_DIRECT_IO | if read_only { LO_FLAGS_READ_ONLY } else { 0 },
                lo_file_name: [0; LO_NAME_SIZE],
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        let name = image.as_os_str().as_encoded_bytes();
        let len = name.len().min(LO_NAME_SIZE - 1);
        config.info.lo_file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which LoopConfig mirrors exactly.
        let rc = unsafe { libc::ioctl(device_file.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig) };
        if rc == 0 {
            return Ok(device);
        }
        let err = std::io::Error::last_os_error();
        // EBUSY: another process configured this device between GET_FREE and CONFIGURE.
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(LoopError::Ioctl { op: "LOOP_CONFIGURE", device: device.path(), source: err });
        }
    }
    Err(LoopError::NoneFree { attempts: ATTEMPTS })
}

/// Detaches the device. If something still holds it open, the kernel detaches it on last close.
pub fn detach(device: LoopDevice) -> Result<(), LoopError> {
    let file = match open_device(&device.path(), false) {
        Ok(file) => file,
        Err(LoopError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_CLR_FD, 0) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        // ENXIO: the device is not bound to anything, which is what we wanted.
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(());
        }
        return Err(LoopError::Ioctl { op: "LOOP_CLR_FD", device: device.path(), source: err });
    }
    Ok(())
}

/// Whether this process may attach loop devices at all (for the Identity probe).
pub fn control_available() -> bool {
    OpenOptions::new().read(true).write(true).open(LOOP_CONTROL).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_config_matches_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn backing_files_are_matched_by_device_and_inode_not_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vol.img");
        std::fs::write(&file, b"x").unwrap();
        let metadata = std::fs::metadata(&file).unwrap();
        use std::os::unix::fs::MetadataExt;
        let dev = (libc::major(metadata.dev()), libc::minor(metadata.dev()));
        let seen_elsewhere = Backing { path: "/pool/vol.img".into(), dev, inode: metadata.ino() };
        assert!(seen_elsewhere.is(&metadata), "another mount namespace's path, the same file");
        let other = Backing { path: file.clone(), dev, inode: metadata.ino() + 1 };
        assert!(!other.is(&metadata), "the same path, another file");
        assert!(Backing { path: "/pool/vol.img (deleted)".into(), dev, inode: 1 }.deleted());
    }

    #[test]
    fn finds_loop_devices_in_the_partition_table() {
        let table = "major minor  #blocks  name\n\n 254        0  268435456 vda\n 254        1     1024 vda1\n   7        0      10240 loop0\n 259        0       512 loop0p1\n   7       12    1048576 loop12\n";
        assert_eq!(loop_numbers_in_partitions(table), vec![0, 12]);
        assert!(loop_numbers_in_partitions("").is_empty());
    }

    #[test]
    fn parses_device_paths() {
        assert_eq!(LoopDevice::from_path(Path::new("/dev/loop12")), Some(LoopDevice { number: 12 }));
        assert_eq!(LoopDevice::from_path(Path::new("/dev/sda")), None);
        assert_eq!(LoopDevice { number: 3 }.path(), PathBuf::from("/dev/loop3"));
    }
}
