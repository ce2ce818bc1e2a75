//! Node-side operations: stage (attach + format-if-blank + mount), publish (bind mount),
//! unpublish, unstage (unmount + detach), stats, and the start-up reconcile.
//!
//! Every operation looks before it acts: the mount table before mounting or unmounting, blkid
//! before mkfs, the loop devices' backing files before attaching. "Already done" is success.

use std::path::{Path, PathBuf};

use crate::Engine;
use crate::caps::{AccessType, Capability};
use crate::error::{Context, Error, Result};
use crate::ids::VolumeId;
use crate::model::{FsType, Layout, Published, Staged, VolumeRecord};
use crate::mountopts;
use crate::sys::loopdev::{self, LoopDevice};
use crate::sys::mkfs::{self, Probe};
use crate::sys::mount::{self, MsFlags};
use crate::sys::mountinfo::MountTable;
use crate::sys::statfs;

/// Figures for NodeGetVolumeStats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeStats {
    Filesystem(statfs::FsUsage),
    Block { total_bytes: u64 },
}

/// What the start-up reconcile did.
#[derive(Debug, Default, Clone)]
pub struct ReconcileReport {
    pub restored: Vec<String>,
    pub detached: Vec<String>,
    pub problems: Vec<String>,
}

fn require(what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    Ok(())
}

fn mount_table() -> Result<MountTable> {
    MountTable::read().context(|| "reading the mount table".to_owned())
}

/// Creates `path` as a directory (filesystem publish) or an empty file (block publish).
/// Returns whether it was created here, so a failed publish can remove it again.
fn ensure_target(path: &Path, block: bool) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if block && meta.is_file() => Ok(false),
        Ok(meta) if !block && meta.is_dir() => Ok(false),
        // A CO that pre-created the target as an empty directory for a block volume.
        Ok(meta) if block && meta.is_dir() && std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_none()) => {
            std::fs::remove_dir(path).context(|| format!("replacing directory {}", path.display()))?;
            ensure_target(path, block)
        }
        Ok(_) => Err(Error::InvalidArgument(format!(
            "target path {} exists but is not {}",
            path.display(),
            if block { "a file" } else { "a directory" }
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let created = if block {
                std::fs::OpenOptions::new().write(true).create_new(true).open(path).map(drop)
            } else {
                std::fs::create_dir(path)
            };
            created.context(|| format!("creating {}", path.display()))?;
            Ok(true)
        }
        Err(e) => Err(e).context(|| format!("inspecting {}", path.display())),
    }
}

fn remove_target(path: &Path) -> Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context(|| format!("removing {}", path.display())),
    }
}

impl Engine {
    fn node_volume_id(&self, raw_id: &str) -> Result<VolumeId> {
        VolumeId::parse(raw_id)
            .ok_or_else(|| Error::NotFound(format!("volume {raw_id:?} does not exist on node {}", self.node_id)))
    }

    fn node_record(&self, id: &VolumeId) -> Result<VolumeRecord> {
        self.store
            .load(id)?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist on node {}", self.node_id)))
    }

    fn attached_device(&self, id: &VolumeId) -> Result<Option<LoopDevice>> {
        loopdev::find_by_backing_file(&self.pool.image_path(id))
            .map_err(|e| Error::internal(format!("looking for the loop device of {id}"), e))
    }

    pub fn stage_volume(&self, raw_id: &str, staging_raw: &str, cap: &Capability) -> Result<()> {
        require("volume_id", raw_id)?;
        require("staging_target_path", staging_raw)?;
        let id = self.node_volume_id(raw_id)?;
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.node_record(&id)?;
        cap.check_layout(record.layout)?;
        let staging = self.paths.confine("staging_target_path", staging_raw)?;
        self.stage_locked(&mut record, &staging, cap)
    }

    fn stage_locked(&self, record: &mut VolumeRecord, staging: &Path, cap: &Capability) -> Result<()> {
        let id = record.id.clone();
        let (mount_fs, mount_flags) = match (&cap.access_type, record.layout) {
            (AccessType::Mount { mount_flags, .. }, Layout::Filesystem { fs_type }) => {
                // Validate before touching anything, so bad options leave no device behind.
                mountopts::parse(mount_flags, Some(fs_type), &self.allowed_mount_options)?;
                (Some(fs_type), mount_flags.clone())
            }
            _ => (None, Vec::new()),
        };
        if let Some(staged) = &record.staged
            && staged.staging_path != staging
            && self.attached_device(&id)?.is_some()
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
        let (device, attached_here) = match self.attached_device(&id)? {
            Some(device) => (device, false),
            None => {
                let device =
                    loopdev::attach(&image, false).map_err(|e| Error::internal(format!("attaching volume {id}"), e))?;
                (device, true)
            }
        };
        let prepared = self.refresh_device_size(record, device).and_then(|()| match mount_fs {
            Some(fs) => self.mount_staging(record, device, staging, fs, &mount_flags, cap.mode.read_only()),
            None => Ok(()),
        });
        if let Err(err) = prepared {
            if attached_here {
                let _ = loopdev::detach(device);
            }
            return Err(err);
        }
        if !device.direct_io() {
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
        self.store.save(record)?;
        tracing::info!(volume_id = %id, device = %device.path().display(), staging = %staging.display(), "volume staged");
        Ok(())
    }

    /// An attached device keeps the size its image had at attach time: catch up after growth.
    fn refresh_device_size(&self, record: &VolumeRecord, device: LoopDevice) -> Result<()> {
        let size = device.size_bytes().map_err(|e| Error::internal(format!("sizing {}", record.id), e))?;
        if size < record.capacity_bytes {
            device
                .refresh_capacity()
                .map_err(|e| Error::internal(format!("refreshing the size of {}", record.id), e))?;
        }
        Ok(())
    }

    /// Mounts the filesystem at the staging path: formats a blank device first, and grows a
    /// filesystem smaller than its volume (expanded while unstaged, or restored into more space).
    fn mount_staging(
        &self,
        record: &mut VolumeRecord,
        device: LoopDevice,
        staging: &Path,
        fs: FsType,
        mount_flags: &[String],
        read_only: bool,
    ) -> Result<()> {
        let id = record.id.clone();
        let dev_path = device.path();
        if let Some(existing) = mount_table()?.top_mount_at(staging) {
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
        ensure_target(staging, false)?;
        let wants_growth = |record: &VolumeRecord| !read_only && record.filesystem_bytes < record.capacity_bytes;
        match mkfs::probe(&dev_path).map_err(|e| Error::internal(format!("probing {id}"), e))? {
            Probe::Blank => {
                tracing::info!(volume_id = %id, fs = fs.as_str(), "formatting blank volume");
                mkfs::make_filesystem(&dev_path, fs, &record.mkfs_options)
                    .map_err(|e| Error::internal(format!("formatting {id}"), e))?;
                record.filesystem_bytes = record.capacity_bytes;
            }
            Probe::Filesystem(found) if found == fs.as_str() => {
                if fs == FsType::Ext4 && wants_growth(record) {
                    mkfs::grow_unmounted_ext4(&dev_path)
                        .map_err(|e| Error::internal(format!("growing the filesystem of {id}"), e))?;
                    tracing::info!(volume_id = %id, bytes = record.capacity_bytes, "filesystem grown before mounting");
                    record.filesystem_bytes = record.capacity_bytes;
                }
            }
            Probe::Filesystem(found) => {
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
        mount::mount_filesystem(&dev_path, staging, fs.as_str(), options.flags, &options.data_string())
            .map_err(|e| Error::internal(format!("mounting {id}"), e))?;
        if wants_growth(record) {
            // xfs and btrfs grow only while mounted.
            if let Err(err) = self.grow_mounted(record, device, staging, fs) {
                let _ = mount::unmount(staging);
                return Err(err);
            }
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
            statfs::usage(mount_point)
                .map(|u| u.total_bytes)
                .context(|| format!("statfs {} {what}", mount_point.display()))
        };
        let before = usage("before growing")?;
        mkfs::grow_filesystem(&device.path(), mount_point, fs).map_err(|e| {
            let hint = if fs == FsType::Ext4 {
                " (online ext4 growth needs CAP_SYS_RESOURCE; without it the filesystem grows on next stage)"
            } else {
                ""
            };
            Error::internal(format!("growing the filesystem of {id}{hint}"), e)
        })?;
        let after = usage("after growing")?;
        if after <= before {
            return Err(Error::internal(
                format!("growing the filesystem of {id}"),
                format!("it still has {after} bytes after growing to a {} byte device", record.capacity_bytes),
            ));
        }
        tracing::info!(volume_id = %id, from = before, to = after, "filesystem grown");
        record.filesystem_bytes = record.capacity_bytes;
        Ok(())
    }

    /// NodeExpandVolume: make the device and the filesystem at `path` match the volume's size.
    pub fn node_expand_volume(&self, raw_id: &str, path_raw: &str, required: i64) -> Result<u64> {
        require("volume_id", raw_id)?;
        require("volume_path", path_raw)?;
        let id = self.node_volume_id(raw_id)?;
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.node_record(&id)?;
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
            .attached_device(&id)?
            .ok_or_else(|| Error::FailedPrecondition(format!("volume {id} is not attached; stage it first")))?;
        self.refresh_device_size(&record, device)?;
        if let (Layout::Filesystem { fs_type }, true, false) =
            (record.layout, staged.filesystem_mounted, staged.read_only)
            && record.filesystem_bytes < record.capacity_bytes
        {
            self.grow_mounted(&mut record, device, &staged.staging_path, fs_type)?;
            self.store.save(&record)?;
        }
        device.size_bytes().map_err(|e| Error::internal(format!("sizing {id}"), e))
    }

    /// Whether the volume is staged at `staging` right now (record and reality agree).
    fn staged_at(&self, record: &VolumeRecord, staging: &Path, table: &MountTable) -> Result<Option<LoopDevice>> {
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

    pub fn unstage_volume(&self, raw_id: &str, staging_raw: &str) -> Result<()> {
        require("volume_id", raw_id)?;
        require("staging_target_path", staging_raw)?;
        let id = self.node_volume_id(raw_id)?;
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.node_record(&id)?;
        let staging = self.paths.confine_existing("staging_target_path", staging_raw)?;
        if record.staged.as_ref().is_some_and(|s| s.staging_path != staging) {
            // Staged somewhere else: nothing of this volume lives at this path.
            return Ok(());
        }
        let table = mount_table()?;
        let live: Vec<&PathBuf> = record.published.keys().filter(|t| table.is_mount_point(t)).collect();
        if !live.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still published at {live:?}; unpublish it first"
            )));
        }
        let device = self.attached_device(&id)?;
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
            mount::unmount(&staging).map_err(|e| Error::internal(format!("unstaging {id}"), e))?;
        }
        if let Some(device) = device {
            let table = mount_table()?;
            let device_path = device.path();
            let others: Vec<&Path> = table.mounts_of_device(&device_path).map(|m| m.mount_point.as_path()).collect();
            if !others.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} ({}) is still mounted at {others:?}",
                    device.path().display()
                )));
            }
            loopdev::detach(device).map_err(|e| Error::internal(format!("detaching {id}"), e))?;
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

    pub fn publish_volume(
        &self,
        raw_id: &str,
        staging_raw: &str,
        target_raw: &str,
        cap: &Capability,
        readonly: bool,
    ) -> Result<()> {
        require("volume_id", raw_id)?;
        require("staging_target_path", staging_raw)?;
        require("target_path", target_raw)?;
        let id = self.node_volume_id(raw_id)?;
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.node_record(&id)?;
        cap.check_layout(record.layout)?;
        let staging = self.paths.confine("staging_target_path", staging_raw)?;
        let target = self.paths.confine("target_path", target_raw)?;
        if target == staging {
            return Err(Error::InvalidArgument("target_path must differ from staging_target_path".into()));
        }
        let block = matches!(cap.access_type, AccessType::Block);
        let mount_flags = match &cap.access_type {
            AccessType::Mount { mount_flags, .. } => mount_flags.clone(),
            AccessType::Block => Vec::new(),
        };
        let mut options = mountopts::parse(
            &mount_flags,
            if block { None } else { record.layout.fs_type() },
            &self.allowed_mount_options,
        )?;
        let read_only = readonly || cap.mode.read_only();
        if read_only {
            options.flags |= MsFlags::MS_RDONLY;
        }

        let mut table = mount_table()?;
        let device = match self.staged_at(&record, &staging, &table)? {
            Some(device) => device,
            None if block || record.layout == Layout::Block => {
                // Stage again (kubernetes#106729: publish without stage after a failed unstage).
                self.stage_locked(
                    &mut record,
                    &staging,
                    &Capability { access_type: AccessType::Block, mode: cap.mode },
                )?;
                table = mount_table()?;
                self.attached_device(&id)?.ok_or_else(|| Error::internal("re-staging", "device vanished"))?
            }
            None => {
                tracing::info!(volume_id = %id, "not staged at {}; staging again before publish", staging.display());
                self.stage_locked(&mut record, &staging, cap)?;
                table = mount_table()?;
                self.attached_device(&id)?.ok_or_else(|| Error::internal("re-staging", "device vanished"))?
            }
        };
        if cap.mode.single_writer() {
            let others: Vec<&PathBuf> =
                record.published.keys().filter(|t| **t != target && table.is_mount_point(t)).collect();
            if !others.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} has a single-writer access mode and is already published at {others:?}"
                )));
            }
        }
        if let Some(existing) = table.top_mount_at(&target) {
            // A bound device node shows devtmpfs's numbers, with the node's name as its root.
            let same_device = if block {
                existing.root == Path::new("/").join(device.path().file_name().unwrap_or_default())
            } else {
                existing.is_from(&device.path())
            };
            let recorded = record.published.get(&target);
            if same_device && existing.is_read_only() == read_only && recorded.is_none_or(|p| p.block == block) {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "target path {} is already published with a different configuration",
                target.display()
            )));
        }

        let created = ensure_target(&target, block)?;
        let source = if block { device.path() } else { staging.clone() };
        if let Err(err) = mount::bind(&source, &target, options.flags) {
            if created {
                let _ = remove_target(&target);
            }
            return Err(Error::internal(format!("publishing {id}"), err));
        }
        record.published.insert(target.clone(), Published { read_only, block, mount_flags });
        if let Err(err) = self.store.save(&record) {
            let _ = mount::unmount(&target);
            return Err(err);
        }
        tracing::info!(volume_id = %id, target = %target.display(), read_only, block, "volume published");
        Ok(())
    }

    pub fn unpublish_volume(&self, raw_id: &str, target_raw: &str) -> Result<()> {
        require("volume_id", raw_id)?;
        require("target_path", target_raw)?;
        let id = self.node_volume_id(raw_id)?;
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.node_record(&id)?;
        let target = self.paths.confine_existing("target_path", target_raw)?;
        let table = mount_table()?;
        if let Some(existing) = table.top_mount_at(&target) {
            let ours = record.published.contains_key(&target)
                || self.attached_device(&id)?.is_some_and(|d| existing.is_from(&d.path()));
            if !ours {
                return Err(Error::FailedPrecondition(format!(
                    "target path {} holds a mount that is not volume {id}; leaving it alone",
                    target.display()
                )));
            }
            mount::unmount(&target).map_err(|e| Error::internal(format!("unpublishing {id}"), e))?;
        }
        remove_target(&target)?;
        if record.published.remove(&target).is_some() {
            self.store.save(&record)?;
        }
        tracing::info!(volume_id = %id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    /// Usage figures for `path` and the volume's condition.
    pub fn volume_stats(&self, raw_id: &str, path_raw: &str) -> Result<(VolumeStats, Option<String>)> {
        let stats = self.volume_usage(raw_id, path_raw)?;
        let record = self.node_record(&self.node_volume_id(raw_id)?)?;
        Ok((stats, self.volume_condition(&record)?))
    }

    fn volume_usage(&self, raw_id: &str, path_raw: &str) -> Result<VolumeStats> {
        require("volume_id", raw_id)?;
        require("volume_path", path_raw)?;
        let id = self.node_volume_id(raw_id)?;
        let record = self.node_record(&id)?;
        let path = PathBuf::from(path_raw);
        let not_here =
            || Error::NotFound(format!("{path_raw:?} is not a path where volume {id} is staged or published"));
        let block = match (record.published.get(&path), &record.staged) {
            (Some(published), _) => published.block,
            (None, Some(staged)) if staged.staging_path == path => !staged.filesystem_mounted,
            _ => return Err(not_here()),
        };
        let device = self.attached_device(&id)?.ok_or_else(not_here)?;
        if block || record.layout == Layout::Block {
            let total_bytes = device.size_bytes().map_err(|e| Error::internal(format!("sizing {id}"), e))?;
            return Ok(VolumeStats::Block { total_bytes });
        }
        if !mount_table()?.top_mount_at(&path).is_some_and(|m| m.is_from(&device.path())) {
            return Err(not_here());
        }
        statfs::usage(&path).map(VolumeStats::Filesystem).context(|| format!("statfs {}", path.display()))
    }

    /// Health of a volume on this node: `None` when normal, otherwise what is wrong.
    pub fn volume_condition(&self, record: &VolumeRecord) -> Result<Option<String>> {
        Ok(self.volume_conditions(std::slice::from_ref(record))?.remove(0))
    }

    /// Conditions of many volumes, reading the mount table and the loop devices once.
    pub fn volume_conditions(&self, records: &[VolumeRecord]) -> Result<Vec<Option<String>>> {
        let table = mount_table()?;
        let devices = loopdev::attached_devices().map_err(|e| Error::internal("listing loop devices", e))?;
        Ok(records.iter().map(|record| self.condition_of(record, &table, &devices)).collect())
    }

    fn condition_of(
        &self,
        record: &VolumeRecord,
        table: &MountTable,
        devices: &[(LoopDevice, PathBuf)],
    ) -> Option<String> {
        let image = self.pool.image_path(&record.id);
        if !image.exists() {
            return Some(format!("the image file of {} is missing from the pool", record.id));
        }
        let staged = record.staged.as_ref()?;
        let Some((device, _)) = devices.iter().find(|(_, backing)| *backing == image) else {
            return Some(format!("staged at {} but its loop device is gone", staged.staging_path.display()));
        };
        let device_path = device.path();
        if staged.filesystem_mounted
            && !table.top_mount_at(&staged.staging_path).is_some_and(|m| m.is_from(&device_path))
        {
            return Some(format!("the staging mount at {} has vanished", staged.staging_path.display()));
        }
        if let Some(target) = record.published.keys().find(|t| !table.is_mount_point(t)) {
            return Some(format!("the publish mount at {} has vanished", target.display()));
        }
        if record.layout.fs_type() == Some(FsType::Ext4) && staged.filesystem_mounted {
            let errors = std::fs::read_to_string(format!(
                "/sys/fs/ext4/{}/errors_count",
                device_path.file_name().unwrap_or_default().to_string_lossy()
            ));
            if let Some(count) = errors.ok().and_then(|t| t.trim().parse::<u64>().ok()).filter(|&n| n > 0) {
                return Some(format!("the ext4 filesystem has recorded {count} error(s); run fsck"));
            }
        }
        None
    }

    /// Brings the node back to what the records say after a restart or reboot: re-attach and
    /// re-mount staged volumes (before the CO asks), and detach loop devices of the pool that
    /// nothing uses (leaks from crashes). Never deletes data; problems are reported, not fatal.
    pub fn reconcile_on_start(&self) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let records = match self.store.list() {
            Ok(records) => records,
            Err(err) => {
                report.problems.push(format!("listing volumes: {}", err.chain()));
                return report;
            }
        };
        for record in &records {
            if let Err(err) = self.reconcile_volume(record.clone(), &mut report) {
                report.problems.push(format!("{}: {}", record.id, err.chain()));
            }
        }
        if let Ok(orphans) = self.pool.orphan_images(&records) {
            for orphan in orphans {
                report.problems.push(format!("image {} has no volume record; left in place", orphan.display()));
            }
        }
        report
    }

    fn reconcile_volume(&self, mut record: VolumeRecord, report: &mut ReconcileReport) -> Result<()> {
        let id = record.id.clone();
        let _guard = self.locks.try_lock(id.as_str())?;
        let Some(staged) = record.staged.clone() else {
            if let Some(device) = self.attached_device(&id)?
                && mount_table()?.mounts_of_device(&device.path()).next().is_none()
            {
                loopdev::detach(device).map_err(|e| Error::internal("detaching leaked device", e))?;
                report.detached.push(id.to_string());
            }
            return Ok(());
        };
        let mode = if staged.read_only {
            crate::caps::AccessMode::SingleNodeReaderOnly
        } else {
            crate::caps::AccessMode::SingleNodeWriter
        };
        let access_type = if staged.filesystem_mounted {
            AccessType::Mount {
                fs_type: None,
                mount_flags: staged.mount_flags.clone(),
                volume_mount_group: String::new(),
            }
        } else {
            AccessType::Block
        };
        let table = mount_table()?;
        if self.staged_at(&record, &staged.staging_path, &table)?.is_none() {
            self.stage_locked(&mut record, &staged.staging_path, &Capability { access_type, mode })?;
            report.restored.push(format!("{id} staged at {}", staged.staging_path.display()));
        }
        let table = mount_table()?;
        let device = self.attached_device(&id)?.ok_or_else(|| Error::internal("reconcile", "device vanished"))?;
        let mut changed = false;
        for (target, published) in record.published.clone() {
            if table.is_mount_point(&target) {
                continue;
            }
            if !self.restore_publications || !target.parent().is_some_and(Path::exists) {
                record.published.remove(&target);
                changed = true;
                continue;
            }
            let source = if published.block { device.path() } else { staged.staging_path.clone() };
            let mut flags = if published.block { MsFlags::MS_NOSUID } else { MsFlags::MS_NOSUID | MsFlags::MS_NODEV };
            if published.read_only {
                flags |= MsFlags::MS_RDONLY;
            }
            ensure_target(&target, published.block)?;
            mount::bind(&source, &target, flags).map_err(|e| Error::internal("restoring publication", e))?;
            report.restored.push(format!("{id} published at {}", target.display()));
        }
        if changed {
            self.store.save(&record)?;
        }
        Ok(())
    }
}
