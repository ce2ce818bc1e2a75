//! Stage (attach, format if blank, grow if the volume outgrew its filesystem, mount), unstage,
//! and node expansion.

use std::path::{Path, PathBuf};

use super::ensure_target;
use crate::Engine;
use crate::caps::{AccessType, Capability};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::ids::VolumeId;
use crate::model::{FsType, Layout, Staged, VolumeRecord};
use crate::mountopts;
use crate::paths::Pinned;
use crate::sys::loopdev::LoopDevice;
use crate::sys::mkfs::Probe;
use crate::sys::mount::MsFlags;
use crate::sys::mountinfo::MountTable;

/// What one stage did, so a caller whose later step fails can undo exactly that.
#[derive(Debug, Clone)]
pub(super) struct StageDone {
    pub device: LoopDevice,
    attached_here: bool,
    mounted_here: bool,
    created_staging_dir: bool,
    /// The record's `staged` before this call.
    previous: Option<Staged>,
}

impl Engine {
    pub fn stage_volume(&self, id: &VolumeId, staging_raw: &str, cap: &Capability) -> Result<()> {
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.node_record(id)?;
        cap.check_layout(record.layout)?;
        let staging = self.paths.confine("staging_target_path", staging_raw)?;
        self.stage_locked(&mut record, &staging, cap).map(drop)
    }

    /// Stages under the volume's lock; on failure nothing it did is left behind.
    pub(super) fn stage_locked(
        &self,
        record: &mut VolumeRecord,
        staging: &Path,
        cap: &Capability,
    ) -> Result<StageDone> {
        let id = record.id.clone();
        let (mount_fs, mount_flags) = match (&cap.access_type, record.layout) {
            (AccessType::Mount { mount_flags, .. }, Layout::Filesystem { fs_type }) => {
                // Validate before touching anything, so bad options leave no device behind.
                mountopts::parse(mount_flags, Some(fs_type), &self.allowed_mount_options)?;
                let never_formatted = record.filesystem_bytes == 0;
                let outgrown =
                    !never_formatted && !cap.mode.read_only() && record.filesystem_bytes < record.capacity_bytes;
                self.require_tools(fs_type, never_formatted, outgrown)?;
                (Some(fs_type), mount_flags.clone())
            }
            _ => (None, Vec::new()),
        };
        let attached = self.attached_device(&id)?;
        if let Some(staged) = &record.staged
            && staged.staging_path != staging
            && attached.is_some()
        {
            return Err(Error::AlreadyExists(format!(
                "volume {id} is already staged at {}, not {}",
                staged.staging_path.display(),
                staging.display()
            )));
        }
        let image = self.pool.image_path(&id);
        if !image.exists() {
            return Err(Error::FailedPrecondition(format!("the image of volume {id} is missing from the pool")));
        }
        let (device, attached_here) = match attached {
            Some(device) => (device, false),
            None => (self.attach_with_its_geometry(record, &image, mount_fs.is_some())?, true),
        };
        let mut done = StageDone {
            device,
            attached_here,
            mounted_here: false,
            created_staging_dir: false,
            previous: record.staged.clone(),
        };
        let prepared = failpoint::check("stage.attached")
            .and_then(|()| self.refresh_device_size(record, device))
            .and_then(|()| match mount_fs {
                Some(fs) => self.mount_staging(record, &mut done, staging, fs, &mount_flags, cap.mode.read_only()),
                None => Ok(()),
            });
        if let Err(err) = prepared {
            self.undo_stage(&done, staging);
            return Err(self.pool_full_or(err));
        }
        if !self.host.loop_direct_io(device) {
            tracing::warn!(volume_id = %id, device = %device.path().display(),
                "loop device runs with buffered I/O: the pool filesystem does not support direct I/O");
        }
        record.staged = Some(Staged {
            staging_path: staging.to_owned(),
            device: device.path(),
            read_only: cap.mode.read_only(),
            filesystem_mounted: mount_fs.is_some(),
            mount_flags,
        });
        if let Err(err) = self.store.save(record) {
            self.undo_stage(&done, staging);
            record.staged = done.previous;
            return Err(err);
        }
        tracing::info!(volume_id = %id, device = %device.path().display(), staging = %staging.display(), "volume staged");
        Ok(done)
    }

    /// Attaches the image with the logical block size its filesystem was made for. Volumes of
    /// record schema 1 may predate plinth's fixed 4096 (a filesystem with 1 KiB blocks or 512-byte
    /// sectors, which a 4096 device cannot mount): their geometry is read off the filesystem
    /// once and recorded with the stage.
    fn attach_with_its_geometry(
        &self,
        record: &mut VolumeRecord,
        image: &Path,
        filesystem: bool,
    ) -> Result<LoopDevice> {
        use crate::sys::loopdev::LOGICAL_BLOCK_SIZE;
        const LEGACY_BLOCK_SIZE: u32 = 512;
        let id = record.id.clone();
        let attach = |block_size| {
            self.attach_loop(image, false, block_size).map_err(|e| Error::internal(format!("attaching volume {id}"), e))
        };
        let device = attach(record.loop_block_size.unwrap_or(LOGICAL_BLOCK_SIZE))?;
        if record.loop_block_size.is_some() || !filesystem {
            return Ok(device);
        }
        let probed = self.host.probe(&device.path(), image).map_err(|e| Error::internal(format!("probing {id}"), e));
        let legacy = match probed {
            Ok(Probe::Filesystem { block_size: Some(bs), .. }) => bs < LOGICAL_BLOCK_SIZE,
            Ok(_) => false,
            Err(err) => {
                let _ = self.detach_loop(device);
                return Err(err);
            }
        };
        if !legacy {
            record.loop_block_size = Some(LOGICAL_BLOCK_SIZE);
            return Ok(device);
        }
        tracing::info!(volume_id = %id, "formatted for 512-byte sectors before plinth fixed 4096: attaching it so");
        self.detach_loop(device).map_err(|e| Error::internal(format!("re-attaching {id}"), e))?;
        let device = attach(LEGACY_BLOCK_SIZE)?;
        record.loop_block_size = Some(LEGACY_BLOCK_SIZE);
        Ok(device)
    }

    /// Reverses what one stage did (best effort: the caller reports the original error).
    pub(super) fn undo_stage(&self, done: &StageDone, staging: &Path) {
        if done.mounted_here
            && let Err(err) = self.host.unmount(staging)
        {
            tracing::error!(staging = %staging.display(), error = %err, "undoing a failed stage: unmount failed");
        }
        if done.created_staging_dir {
            let _ = std::fs::remove_dir(staging);
        }
        if done.attached_here
            && let Err(err) = self.detach_loop(done.device)
        {
            tracing::error!(device = %done.device.path().display(), error = %err, "undoing a failed stage: detach failed");
        }
    }

    /// Puts the record back as it was before a stage that a later step had to undo.
    pub(super) fn forget_stage(&self, record: &mut VolumeRecord, done: StageDone) {
        record.staged = done.previous;
        if let Err(err) = self.store.save(record) {
            tracing::error!(volume_id = %record.id, error = %err.chain(), "restoring the record after an undone stage");
        }
    }

    /// An attached device keeps the size its image had at attach time: catch up after growth.
    fn refresh_device_size(&self, record: &VolumeRecord, device: LoopDevice) -> Result<()> {
        let size = self.host.loop_size(device).map_err(|e| Error::internal(format!("sizing {}", record.id), e))?;
        if size < record.capacity_bytes {
            self.host
                .refresh_loop_capacity(device)
                .map_err(|e| Error::internal(format!("refreshing the size of {}", record.id), e))?;
        }
        Ok(())
    }

    /// Mounts the filesystem at the staging path: formats a blank device first, and grows a
    /// filesystem smaller than its volume (expanded while unstaged, or restored into more space).
    fn mount_staging(
        &self,
        record: &mut VolumeRecord,
        done: &mut StageDone,
        staging: &Path,
        fs: FsType,
        mount_flags: &[String],
        read_only: bool,
    ) -> Result<()> {
        let id = record.id.clone();
        let dev_path = done.device.path();
        if let Some(existing) = self.mount_table()?.top_mount_at(staging) {
            if existing.is_from(&dev_path) {
                return Ok(());
            }
            return Err(Error::FailedPrecondition(format!(
                "staging path {} already holds another mount ({} from {})",
                staging.display(),
                existing.fs_type,
                existing.source
            )));
        }
        let mut options = mountopts::parse(mount_flags, Some(fs), &self.allowed_mount_options)?;
        if read_only {
            options.flags |= MsFlags::MS_RDONLY;
        }
        if fs == FsType::Xfs && !options.data.iter().any(|o| o == "nouuid") {
            // Clones and restores carry their source's UUID; XFS refuses a second mount of one.
            options.data.push("nouuid".into());
        }
        let wants_growth = |record: &VolumeRecord| !read_only && record.filesystem_bytes < record.capacity_bytes;
        let image = self.pool.image_path(&id);
        match self.host.probe(&dev_path, &image).map_err(|e| Error::internal(format!("probing {id}"), e))? {
            Probe::Blank => {
                tracing::info!(volume_id = %id, fs = fs.as_str(), "formatting blank volume");
                self.host
                    .make_filesystem(&dev_path, fs, &record.mkfs_options)
                    .map_err(|e| Error::internal(format!("formatting {id}"), e))?;
                record.filesystem_bytes = record.capacity_bytes;
                failpoint::check("stage.formatted")?;
            }
            Probe::Filesystem { fs: found, .. } if found == fs.as_str() => {
                if record.filesystem_bytes == 0 {
                    tracing::info!(volume_id = %id, "found a filesystem the record does not know of (a stage interrupted after mkfs?); adopting it, not formatting");
                }
                if fs == FsType::Ext4 && wants_growth(record) {
                    self.host
                        .grow_unmounted_ext4(&dev_path)
                        .map_err(|e| Error::internal(format!("growing the filesystem of {id}"), e))?;
                    tracing::info!(volume_id = %id, bytes = record.capacity_bytes, "filesystem grown before mounting");
                    record.filesystem_bytes = record.capacity_bytes;
                }
            }
            Probe::Filesystem { fs: found, .. } => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} holds a {found} filesystem, not {}; plinth never reformats existing data",
                    fs.as_str()
                )));
            }
            Probe::Other(found) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} holds {found}; plinth never formats over existing data"
                )));
            }
        }
        done.created_staging_dir = ensure_target(staging, false)?;
        let pinned = Pinned::open(staging)?;
        self.host
            .mount_filesystem(&dev_path, &pinned, fs, options.flags, &options.data_string())
            .map_err(|e| Error::internal(format!("mounting {id}"), e))?;
        done.mounted_here = true;
        failpoint::check("stage.mounted")?;
        if wants_growth(record) {
            // xfs and btrfs grow only while mounted.
            self.grow_mounted(record, done.device, staging, fs)?;
        } else if record.filesystem_bytes == record.capacity_bytes && record.filesystem_usable_bytes.is_none() {
            // The reference a later growth is checked against (volumes made before it was kept).
            record.filesystem_usable_bytes = self.host.statfs(staging).ok().map(|u| u.total_bytes);
        }
        Ok(())
    }

    /// Grows a mounted filesystem to its volume's size and checks that it really grew (a resize
    /// reported done but not done is a bug other drivers shipped).
    fn grow_mounted(
        &self,
        record: &mut VolumeRecord,
        device: LoopDevice,
        mount_point: &Path,
        fs: FsType,
    ) -> Result<()> {
        let id = &record.id;
        let usage = |what: &str| {
            self.host
                .statfs(mount_point)
                .map(|u| u.total_bytes)
                .map_err(|e| Error::internal(format!("statfs {} {what}", mount_point.display()), e))
        };
        let before = usage("before growing")?;
        // What the filesystem offered at its last known size: after a crash between a growth and
        // its record, `before` already shows the grown size, and this still tells them apart.
        let reference = record.filesystem_usable_bytes.map_or(before, |known| known.min(before));
        // No size on record, yet a filesystem: a stage formatted it and crashed before it could
        // record that (or someone put it in the image by hand). Its size is unknown and may be
        // the device's already, so a growth that changes nothing is no failure.
        let size_unknown = record.filesystem_bytes == 0;
        let below_floor = record.capacity_bytes < fs.smallest_growth_target();
        if size_unknown && below_floor {
            // No growth is possible, and none is needed: a first stage made it for a device of
            // at most this size, below the size the kernel would grow it to.
            record.filesystem_bytes = record.capacity_bytes;
            record.filesystem_usable_bytes = Some(before);
            return Ok(());
        }
        self.host.grow_filesystem(&device.path(), mount_point, fs).map_err(|e| {
            let hint = match fs {
                FsType::Ext4 => {
                    " (online ext4 growth needs CAP_SYS_RESOURCE; without it the filesystem grows on next stage)"
                }
                FsType::Btrfs if below_floor => " (the kernel grows btrfs only to 256 MiB or more)",
                _ => "",
            };
            Error::internal(format!("growing the filesystem of {id}{hint}"), e)
        })?;
        let after = usage("after growing")?;
        if after <= reference && !size_unknown {
            return Err(Error::internal(
                format!("growing the filesystem of {id}"),
                format!("it still has {after} bytes after growing to a {} byte device", record.capacity_bytes),
            ));
        }
        tracing::info!(volume_id = %id, from = before, to = after, "filesystem grown");
        record.filesystem_bytes = record.capacity_bytes;
        record.filesystem_usable_bytes = Some(after);
        Ok(())
    }

    /// NodeExpandVolume: make the device and the filesystem at `path` match the volume's size.
    pub fn node_expand_volume(&self, id: &VolumeId, path_raw: &str, required: i64) -> Result<u64> {
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.node_record(id)?;
        let path = PathBuf::from(path_raw);
        let staged =
            record
                .staged
                .clone()
                .filter(|s| s.staging_path == path || record.published.contains_key(&path))
                .ok_or_else(|| Error::NotFound(format!("volume {id} is not staged or published at {path_raw:?}")))?;
        if required > 0 && required as u64 > record.capacity_bytes {
            return Err(Error::OutOfRange(format!(
                "volume {id} is {} bytes; expand it through the controller before the node",
                record.capacity_bytes
            )));
        }
        let device = self
            .attached_device(id)?
            .ok_or_else(|| Error::FailedPrecondition(format!("volume {id} is not attached; stage it first")))?;
        self.refresh_device_size(&record, device)?;
        if let (Layout::Filesystem { fs_type }, true, false) =
            (record.layout, staged.filesystem_mounted, staged.read_only)
            && record.filesystem_bytes < record.capacity_bytes
        {
            self.grow_mounted(&mut record, device, &staged.staging_path, fs_type).map_err(|e| self.pool_full_or(e))?;
            failpoint::check("node_expand.grown")?;
            self.store.save(&record)?;
        }
        self.host.loop_size(device).map_err(|e| Error::internal(format!("sizing {id}"), e))
    }

    /// The device, when the volume is staged at `staging` right now (record and reality agree).
    pub(super) fn staged_at(
        &self,
        record: &VolumeRecord,
        staging: &Path,
        table: &MountTable,
    ) -> Result<Option<LoopDevice>> {
        let Some(staged) = record.staged.as_ref().filter(|s| s.staging_path == staging) else {
            return Ok(None);
        };
        let Some(device) = self.attached_device(&record.id)? else {
            return Ok(None);
        };
        if staged.filesystem_mounted && !table.top_mount_at(staging).is_some_and(|m| m.is_from(&device.path())) {
            return Ok(None);
        }
        Ok(Some(device))
    }

    pub fn unstage_volume(&self, id: &VolumeId, staging_raw: &str) -> Result<()> {
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.node_record(id)?;
        let staging = self.paths.confine_existing("staging_target_path", staging_raw)?;
        if record.staged.as_ref().is_some_and(|s| s.staging_path != staging) {
            // Staged somewhere else: nothing of this volume lives at this path.
            return Ok(());
        }
        let table = self.mount_table()?;
        let live: Vec<&PathBuf> = record.published.keys().filter(|t| table.is_mount_point(t)).collect();
        if !live.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still published at {live:?}; unpublish it first"
            )));
        }
        let device = self.attached_device(id)?;
        if let Some(existing) = table.top_mount_at(&staging) {
            let ours = match device {
                Some(device) => existing.is_from(&device.path()),
                None => record.staged.is_some(),
            };
            if !ours {
                return Err(Error::FailedPrecondition(format!(
                    "staging path {} holds a mount that is not volume {id}; leaving it alone",
                    staging.display()
                )));
            }
            self.host.unmount(&staging).map_err(|e| Error::internal(format!("unstaging {id}"), e))?;
            failpoint::check("unstage.unmounted")?;
        }
        if let Some(device) = device {
            let table = self.mount_table()?;
            let device_path = device.path();
            let others: Vec<&Path> = table.mounts_of_device(&device_path).map(|m| m.mount_point.as_path()).collect();
            if !others.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} ({}) is still mounted at {others:?}",
                    device.path().display()
                )));
            }
            self.detach_loop(device).map_err(|e| Error::internal(format!("detaching {id}"), e))?;
            failpoint::check("unstage.detached")?;
        }
        record.staged = None;
        record.published.clear();
        self.store.save(&record)?;
        if staging.starts_with(self.data_dir.join("staging")) {
            // Standalone's own staging directories (a CO owns and removes its own).
            let _ = std::fs::remove_dir(&staging);
        }
        tracing::info!(volume_id = %id, staging = %staging.display(), "volume unstaged");
        Ok(())
    }
}
