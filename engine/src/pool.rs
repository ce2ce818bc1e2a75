//! The pool directory: one sparse (or preallocated) image file per volume, and the capacity
//! accounting that keeps the sum of promises within the disk.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Context, Error, Result};
use crate::ids::{SnapshotId, VolumeId};
use crate::model::{Provisioning, VolumeRecord};
use crate::sys::copy::{self, CopyMethod, Copying};
use crate::sys::statfs::FsUsage;

const PARTIAL_SUFFIX: &str = ".img.partial";
const SNAPSHOT_DIR: &str = "snapshots";

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).context(|| format!("syncing {}", dir.display()))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context(|| format!("removing {}", path.display())),
    }
}

#[derive(Debug, Clone)]
pub struct Pool {
    dir: PathBuf,
    /// The pool directory, open: images are statted by one path component from here rather
    /// than by their full path (measured: a small saving; `at_rest` is what made the big one).
    dir_fd: Arc<OwnedFd>,
    /// Optional operator-set ceiling on the sum of volume sizes.
    capacity_limit: Option<u64>,
    /// Whether the pool's filesystem reflinks: copies are then atomic and O(1).
    shares_blocks: bool,
    /// Allocation of images at rest, by volume: an image no loop device is attached to changes
    /// only through this pool, so its size on disk is statted once, not on every create. Dropped
    /// for an image whenever this pool changes it, and for all whenever a loop device is attached
    /// or detached (`forget_allocations`); staged volumes are always statted afresh.
    at_rest: Arc<Mutex<HashMap<VolumeId, u64>>>,
}

/// One volume as capacity accounting sees it.
#[derive(Debug, Clone, Copy)]
pub struct Promise<'a> {
    pub id: &'a VolumeId,
    pub size: u64,
    /// Staged: its loop device may be writing (or discarding) right now.
    pub staged: bool,
}

/// Capacity figures for GetCapacity and `plinth status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Bytes a new volume can still be given.
    pub available_bytes: u64,
    /// Sum of all volumes' sizes.
    pub provisioned_bytes: u64,
    /// Bytes the images actually occupy on disk.
    pub allocated_bytes: u64,
    pub filesystem_total_bytes: u64,
}

/// What is left for new volumes: the filesystem's free space minus what thin volumes may still
/// claim as they fill up (so no thin volume can hit ENOSPC), capped by the operator's limit.
pub fn available_bytes(
    filesystem_available: u64,
    volumes: impl IntoIterator<Item = (u64, u64)>,
    capacity_limit: Option<u64>,
) -> (u64, u64, u64) {
    let (mut provisioned, mut allocated, mut unclaimed) = (0u64, 0u64, 0u64);
    for (size, on_disk) in volumes {
        provisioned = provisioned.saturating_add(size);
        allocated = allocated.saturating_add(on_disk);
        unclaimed = unclaimed.saturating_add(size.saturating_sub(on_disk));
    }
    let mut available = filesystem_available.saturating_sub(unclaimed);
    if let Some(limit) = capacity_limit {
        available = available.min(limit.saturating_sub(provisioned));
    }
    (available, provisioned, allocated)
}

impl Pool {
    pub fn open(dir: PathBuf, capacity_limit: Option<u64>) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join(SNAPSHOT_DIR))?;
        let dir = std::fs::canonicalize(&dir)?;
        for folder in [dir.clone(), dir.join(SNAPSHOT_DIR)] {
            for entry in std::fs::read_dir(&folder)? {
                let entry = entry?;
                if entry.file_name().to_string_lossy().ends_with(PARTIAL_SUFFIX) {
                    // An image whose creation was interrupted; it was never handed out.
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        let shares_blocks = copy::shares_blocks(&dir);
        let dir_fd = nix::fcntl::open(
            &dir,
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok(Self { dir, dir_fd: Arc::new(dir_fd), capacity_limit, shares_blocks, at_rest: Arc::default() })
    }

    /// Snapshot images live inside the pool so reflinks (same filesystem only) are possible.
    pub fn snapshot_path(&self, id: &SnapshotId) -> PathBuf {
        self.dir.join(SNAPSHOT_DIR).join(format!("{id}.img"))
    }

    /// Whether copies in this pool are reflinks (xfs with reflink, btrfs).
    pub fn shares_blocks(&self) -> bool {
        self.shares_blocks
    }

    /// Copies `source` into a new snapshot image (reflink when possible), complete or not at all.
    pub fn copy_to_snapshot(&self, source: &Path, id: &SnapshotId, copying: Copying) -> Result<CopyMethod> {
        let partial = self.dir.join(SNAPSHOT_DIR).join(format!("{id}{PARTIAL_SUFFIX}"));
        let _ = std::fs::remove_file(&partial);
        let result = (|| -> Result<CopyMethod> {
            let method = copy::copy_image(source, &partial, copying).context(|| format!("snapshotting into {id}"))?;
            std::fs::rename(&partial, self.snapshot_path(id)).context(|| format!("publishing snapshot {id}"))?;
            sync_dir(&self.dir.join(SNAPSHOT_DIR))?;
            Ok(method)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }

    pub fn remove_snapshot_image(&self, id: &SnapshotId) -> Result<()> {
        remove_if_present(&self.snapshot_path(id))?;
        sync_dir(&self.dir.join(SNAPSHOT_DIR))
    }

    /// Creates a volume image as a copy of `source` (a snapshot or volume image), grown to
    /// `size`; thick volumes get every block allocated after the copy.
    pub fn create_image_from(
        &self,
        source: &Path,
        id: &VolumeId,
        size: u64,
        provisioning: Provisioning,
        copying: Copying,
    ) -> Result<CopyMethod> {
        self.forget_allocation(id);
        let partial = self.dir.join(format!("{id}{PARTIAL_SUFFIX}"));
        let _ = std::fs::remove_file(&partial);
        let result = (|| -> Result<CopyMethod> {
            let method = copy::copy_image(source, &partial, copying).context(|| format!("copying data into {id}"))?;
            crate::failpoint::check("pool.copy_written")?;
            let file =
                OpenOptions::new().write(true).open(&partial).context(|| format!("opening {}", partial.display()))?;
            if file.metadata().context(|| format!("stat {}", partial.display()))?.len() > size {
                return Err(Error::OutOfRange(format!("the source is larger than the requested {size} bytes")));
            }
            match provisioning {
                Provisioning::Thin => file.set_len(size).context(|| format!("sizing {}", partial.display()))?,
                Provisioning::Thick => preallocate(&file, size).map_err(|e| match e {
                    nix::Error::ENOSPC => Error::ResourceExhausted(format!("the pool has no room to preallocate {id}")),
                    other => Error::internal(format!("preallocating {}", partial.display()), other),
                })?,
            }
            file.sync_all().context(|| format!("syncing {}", partial.display()))?;
            std::fs::rename(&partial, self.image_path(id)).context(|| format!("publishing image of {id}"))?;
            sync_dir(&self.dir)?;
            Ok(method)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn image_path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.img"))
    }

    pub fn image_exists(&self, id: &VolumeId) -> bool {
        self.image_path(id).exists()
    }

    /// Bytes the image occupies on disk (0 when missing).
    pub fn allocated_bytes(&self, id: &VolumeId) -> u64 {
        let name = format!("{id}.img");
        nix::sys::stat::fstatat(&self.dir_fd, name.as_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map(|st| st.st_blocks as u64 * 512)
            .unwrap_or(0)
    }

    fn at_rest(&self) -> std::sync::MutexGuard<'_, HashMap<VolumeId, u64>> {
        self.at_rest.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes the image occupies on disk: statted if the volume is staged or not known at rest.
    fn allocated_now(&self, volume: Promise<'_>, at_rest: &mut HashMap<VolumeId, u64>) -> u64 {
        if volume.staged {
            return self.allocated_bytes(volume.id);
        }
        if let Some(known) = at_rest.get(volume.id) {
            return *known;
        }
        let allocated = self.allocated_bytes(volume.id);
        at_rest.insert(volume.id.clone(), allocated);
        allocated
    }

    /// Forgets every image's allocation at rest: a loop device was attached or detached, and
    /// whatever it wrote or discarded meanwhile is only on disk.
    pub fn forget_allocations(&self) {
        self.at_rest().clear();
    }

    fn forget_allocation(&self, id: &VolumeId) {
        self.at_rest().remove(id);
    }

    /// Capacity figures for `volumes`, given the pool filesystem's `usage`.
    pub fn capacity<'a>(&self, volumes: impl Iterator<Item = Promise<'a>>, usage: FsUsage) -> Capacity {
        let mut at_rest = self.at_rest();
        let volumes = volumes.map(|v| (v.size, self.allocated_now(v, &mut at_rest)));
        let (available, provisioned, allocated) = available_bytes(usage.available_bytes, volumes, self.capacity_limit);
        Capacity {
            available_bytes: available,
            provisioned_bytes: provisioned,
            allocated_bytes: allocated,
            filesystem_total_bytes: usage.total_bytes,
        }
    }

    /// Creates the image under a temporary name and renames it into place only once it has its
    /// full size (and, for thick volumes, all its blocks), so a visible image is always complete.
    pub fn create_image(&self, id: &VolumeId, size: u64, provisioning: Provisioning) -> Result<()> {
        self.forget_allocation(id);
        let partial = self.dir.join(format!("{id}{PARTIAL_SUFFIX}"));
        let result = (|| -> Result<()> {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&partial)
                .context(|| format!("creating {}", partial.display()))?;
            match provisioning {
                Provisioning::Thin => file.set_len(size).context(|| format!("sizing {}", partial.display()))?,
                Provisioning::Thick => preallocate(&file, size).map_err(|e| match e {
                    nix::Error::ENOSPC => Error::ResourceExhausted(format!(
                        "the pool filesystem has no room to preallocate {size} bytes for {id}"
                    )),
                    other => Error::internal(format!("preallocating {}", partial.display()), other),
                })?,
            }
            file.sync_all().context(|| format!("syncing {}", partial.display()))?;
            std::fs::rename(&partial, self.image_path(id)).context(|| format!("publishing image of {id}"))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).context(|| format!("syncing {}", self.dir.display()))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }

    /// Grows an existing image (thin: set_len; thick: also allocate the new blocks).
    pub fn grow_image(&self, id: &VolumeId, size: u64, provisioning: Provisioning) -> Result<()> {
        // Before and after: a capacity pass in between may have statted it half grown.
        self.forget_allocation(id);
        let grown = self.grow_image_unaccounted(id, size, provisioning);
        self.forget_allocation(id);
        grown
    }

    fn grow_image_unaccounted(&self, id: &VolumeId, size: u64, provisioning: Provisioning) -> Result<()> {
        let path = self.image_path(id);
        let file = OpenOptions::new().write(true).open(&path).context(|| format!("opening {}", path.display()))?;
        match provisioning {
            Provisioning::Thin => file.set_len(size).context(|| format!("growing {}", path.display()))?,
            Provisioning::Thick => preallocate(&file, size).map_err(|e| match e {
                nix::Error::ENOSPC => {
                    Error::ResourceExhausted(format!("the pool has no room to grow {id} to {size} bytes"))
                }
                other => Error::internal(format!("growing {}", path.display()), other),
            })?,
        }
        file.sync_all().context(|| format!("syncing {}", path.display()))
    }

    pub fn remove_image(&self, id: &VolumeId) -> Result<()> {
        self.forget_allocation(id);
        remove_if_present(&self.image_path(id))?;
        sync_dir(&self.dir)
    }

    /// Image files with no record: left by a crash between image and record, or by hand.
    pub fn orphan_images(&self, records: &[VolumeRecord]) -> Result<Vec<PathBuf>> {
        // A set: a linear search per image made this quadratic in the number of volumes.
        let known: std::collections::HashSet<&VolumeId> = records.iter().map(|r| &r.id).collect();
        let mut orphans = Vec::new();
        for entry in std::fs::read_dir(&self.dir).context(|| format!("listing {}", self.dir.display()))? {
            let path = entry.context(|| format!("listing {}", self.dir.display()))?.path();
            let id = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".img"));
            if let Some(id) = id.and_then(VolumeId::parse)
                && !known.contains(&id)
            {
                orphans.push(path);
            }
        }
        Ok(orphans)
    }

    /// Whether the pool can take new files (for the Identity probe).
    pub fn writable(&self) -> bool {
        tempfile::tempfile_in(&self.dir).is_ok()
    }
}

fn preallocate(file: &File, size: u64) -> nix::Result<()> {
    nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, size as libc::off_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_volumes_reserve_what_they_may_still_claim() {
        // 10 GiB free; a 4 GiB thin volume with 1 GiB written may still claim 3 GiB.
        let gib = 1u64 << 30;
        let (available, provisioned, allocated) = available_bytes(10 * gib, [(4 * gib, gib)], None);
        assert_eq!((available, provisioned, allocated), (7 * gib, 4 * gib, gib));
        // Thick volumes are fully allocated: nothing further to reserve.
        assert_eq!(available_bytes(10 * gib, [(4 * gib, 4 * gib)], None).0, 10 * gib);
        // The operator's ceiling applies to the sum of sizes.
        assert_eq!(available_bytes(10 * gib, [(4 * gib, 4 * gib)], Some(6 * gib)).0, 2 * gib);
        assert_eq!(available_bytes(10 * gib, [(8 * gib, 0)], Some(6 * gib)).0, 0);
        assert_eq!(available_bytes(gib, [(8 * gib, 0)], None).0, 0);
    }

    #[test]
    fn creates_thin_and_thick_images_completely() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path().join("pool"), None).unwrap();
        let (thin, thick) = (VolumeId::for_name("thin"), VolumeId::for_name("thick"));
        pool.create_image(&thin, 64 << 20, Provisioning::Thin).unwrap();
        pool.create_image(&thick, 8 << 20, Provisioning::Thick).unwrap();
        assert_eq!(std::fs::metadata(pool.image_path(&thin)).unwrap().len(), 64 << 20);
        assert!(pool.allocated_bytes(&thin) < 1 << 20, "thin image must be sparse");
        assert!(pool.allocated_bytes(&thick) >= 8 << 20, "thick image must be preallocated");
        let records: Vec<VolumeRecord> = vec![];
        assert_eq!(pool.orphan_images(&records).unwrap().len(), 2);
        pool.remove_image(&thin).unwrap();
        pool.remove_image(&thin).unwrap();
        pool.remove_image(&thick).unwrap();
        assert_eq!(std::fs::read_dir(pool.dir()).unwrap().count(), 1, "only the snapshots folder is left");
    }

    #[test]
    fn allocations_at_rest_are_statted_once_and_forgotten_when_anything_may_change_them() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path().join("pool"), None).unwrap();
        let id = VolumeId::for_name("v");
        pool.create_image(&id, 64 << 20, Provisioning::Thin).unwrap();
        let usage = FsUsage {
            total_bytes: 1 << 40,
            free_bytes: 1 << 40,
            available_bytes: 1 << 40,
            total_inodes: 0,
            free_inodes: 0,
        };
        let allocated =
            |staged| pool.capacity(std::iter::once(Promise { id: &id, size: 64 << 20, staged }), usage).allocated_bytes;
        assert!(allocated(false) < 1 << 20);
        // A loop device writes 8 MiB: plinth does not see it.
        let mut image = OpenOptions::new().write(true).open(pool.image_path(&id)).unwrap();
        image.write_all(&vec![7u8; 8 << 20]).unwrap();
        image.sync_all().unwrap();
        assert!(allocated(false) < 1 << 20, "at rest: the figure statted before");
        assert!(allocated(true) >= 8 << 20, "staged: statted afresh every time");
        pool.forget_allocations();
        assert!(allocated(false) >= 8 << 20, "after an attach or detach: statted again");
        pool.grow_image(&id, 64 << 20, Provisioning::Thick).unwrap();
        assert!(allocated(false) >= 64 << 20, "what the pool itself changes, it forgets");
    }
}
