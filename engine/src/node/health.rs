//! NodeGetVolumeStats figures and volume conditions (VOLUME_CONDITION).

use std::path::PathBuf;

use crate::Engine;
use crate::error::{Error, Result};
use crate::ids::VolumeId;
use crate::model::{Layout, VolumeRecord};
use crate::sys::loopdev::{Backing, LoopDevice};
use crate::sys::mountinfo::MountTable;
use crate::sys::statfs::FsUsage;

/// Where one volume is staged and published on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMounts {
    pub id: VolumeId,
    pub staging_path: Option<PathBuf>,
    pub published: Vec<PathBuf>,
}

/// Figures for NodeGetVolumeStats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeStats {
    Filesystem(FsUsage),
    Block { total_bytes: u64 },
}

impl Engine {
    /// Usage figures for `path` and the volume's condition.
    pub fn volume_stats(&self, id: &VolumeId, path_raw: &str) -> Result<(VolumeStats, Option<String>)> {
        let record = self.node_record(id)?;
        let stats = self.volume_usage(&record, path_raw)?;
        Ok((stats, self.volume_condition(&record)?))
    }

    fn volume_usage(&self, record: &VolumeRecord, path_raw: &str) -> Result<VolumeStats> {
        let id = &record.id;
        let path = PathBuf::from(path_raw);
        let not_here =
            || Error::NotFound(format!("{path_raw:?} is not a path where volume {id} is staged or published"));
        let block = match (record.published.get(&path), &record.staged) {
            (Some(published), _) => published.block,
            (None, Some(staged)) if staged.staging_path == path => !staged.filesystem_mounted,
            _ => return Err(not_here()),
        };
        let device = self.attached_device(id)?.ok_or_else(not_here)?;
        if block || record.layout == Layout::Block {
            let total_bytes = self.host.loop_size(device).map_err(|e| Error::internal(format!("sizing {id}"), e))?;
            return Ok(VolumeStats::Block { total_bytes });
        }
        if !self.mount_table()?.top_mount_at(&path).is_some_and(|m| m.is_from(&device.path())) {
            return Err(not_here());
        }
        self.host
            .statfs(&path)
            .map(VolumeStats::Filesystem)
            .map_err(|e| Error::internal(format!("statfs {}", path.display()), e))
    }

    /// Health of a volume on this node: `None` when normal, otherwise what is wrong.
    pub fn volume_condition(&self, record: &VolumeRecord) -> Result<Option<String>> {
        Ok(self.volume_conditions(std::slice::from_ref(record))?.remove(0))
    }

    /// Conditions of many volumes, reading the mount table and the loop devices once.
    pub fn volume_conditions(&self, records: &[VolumeRecord]) -> Result<Vec<Option<String>>> {
        let table = self.mount_table()?;
        let devices = self.host.loop_devices().map_err(|e| Error::internal("listing loop devices", e))?;
        Ok(records.iter().map(|record| self.condition_of(record, &table, &devices)).collect())
    }

    fn condition_of(
        &self,
        record: &VolumeRecord,
        table: &MountTable,
        devices: &[(LoopDevice, Backing)],
    ) -> Option<String> {
        let Ok(image) = std::fs::metadata(self.pool.image_path(&record.id)) else {
            return Some(format!("the image file of {} is missing from the pool", record.id));
        };
        let staged = record.staged.as_ref()?;
        let Some((device, _)) = devices.iter().find(|(_, backing)| backing.is(&image)) else {
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
        if let (Some(fs), true) = (record.layout.fs_type(), staged.filesystem_mounted)
            && let Some(count) = self.host.filesystem_errors(*device, fs).filter(|&n| n > 0)
        {
            return Some(format!("the {} filesystem has recorded {count} error(s); run fsck", fs.as_str()));
        }
        None
    }

    /// Where each volume is staged and published right now: the records, checked against one
    /// read of the mount table (a block volume's staging path is recorded, not mounted).
    pub fn volume_mounts(&self) -> Result<Vec<VolumeMounts>> {
        let table = self.mount_table()?;
        Ok(self
            .store
            .list()?
            .into_iter()
            .map(|record| VolumeMounts {
                staging_path: record.staged.as_ref().map(|s| s.staging_path.clone()),
                published: record.published.keys().filter(|t| table.is_mount_point(t)).cloned().collect(),
                id: record.id,
            })
            .collect())
    }
}
