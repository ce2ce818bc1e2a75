//! The start-up reconcile: bring the node back to what the records say after a restart or a
//! reboot, before the CO asks.

use std::path::Path;

use crate::Engine;
use crate::caps::{AccessMode, AccessType, Capability};
use crate::error::{Context, Error, Result};
use crate::failpoint;
use crate::ids::VolumeId;
use crate::model::VolumeRecord;
use crate::sys::loopdev::{Backing, LoopDevice};
use crate::sys::mountinfo::MountTable;

/// What the start-up reconcile did.
#[derive(Debug, Default, Clone)]
pub struct ReconcileReport {
    pub restored: Vec<String>,
    pub detached: Vec<String>,
    pub problems: Vec<String>,
}

/// The loop devices and the mount table as the reconcile found them, read once for all volumes.
/// Reading them per volume (each read opens every loop device) made a restart O(volumes ×
/// devices): 20 s to ready with 1000 volumes, 200 of them staged. Nothing else acts on the node
/// before the reconcile ends (the socket is bound after it), and each volume's steps touch only
/// its own device and mounts, so one reading stays true for the volumes it has not reached yet.
struct Seen {
    devices: Vec<(LoopDevice, Backing)>,
    table: MountTable,
}

impl Seen {
    /// The device holding the image `metadata` describes, if any.
    fn device_of(&self, metadata: &std::fs::Metadata) -> Option<LoopDevice> {
        self.devices.iter().find(|(_, backing)| backing.is(metadata)).map(|(device, _)| *device)
    }
}

impl Engine {
    /// Re-attaches and re-mounts staged volumes, restores recorded publications where this
    /// process owns them (standalone), and detaches loop devices of the pool that nothing uses
    /// (leaks from crashes). Never deletes data; problems are reported, not fatal.
    pub fn reconcile_on_start(&self) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let records = match self.store.list() {
            Ok(records) => records,
            Err(err) => {
                report.problems.push(format!("listing volumes: {}", err.chain()));
                return report;
            }
        };
        let seen = self.mount_table().and_then(|table| {
            let devices = self.host.loop_devices().map_err(|e| Error::internal("listing loop devices", e))?;
            Ok(Seen { devices, table })
        });
        let seen = match seen {
            Ok(seen) => seen,
            Err(err) => {
                report.problems.push(format!("reading loop devices and mounts: {}", err.chain()));
                return report;
            }
        };
        for record in &records {
            if let Err(err) = self.reconcile_volume(record.clone(), &seen, &mut report) {
                report.problems.push(format!("{}: {}", record.id, err.chain()));
            }
        }
        if let Err(err) = self.detach_devices_of_deleted_images(&mut report) {
            report.problems.push(format!("looking for loop devices of deleted images: {}", err.chain()));
        }
        if let Ok(orphans) = self.pool.orphan_images(&records) {
            for orphan in orphans {
                report.problems.push(format!("image {} has no volume record; left in place", orphan.display()));
            }
        }
        report
    }

    /// Loop devices still holding a pool image that was deleted (a plinth that matched
    /// attachments by path could leak them): nothing can use them again, so they go, unless
    /// something still has them mounted.
    fn detach_devices_of_deleted_images(&self, report: &mut ReconcileReport) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let pool =
            std::fs::metadata(self.pool.dir()).context(|| format!("inspecting {}", self.pool.dir().display()))?;
        let pool_dev = (libc::major(pool.dev()), libc::minor(pool.dev()));
        let table = self.mount_table()?;
        let devices = self.host.loop_devices().map_err(|e| Error::internal("listing loop devices", e))?;
        for (device, backing) in devices {
            let name = backing.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let image_name = name.strip_suffix(" (deleted)").and_then(|n| n.strip_suffix(".img"));
            if backing.dev != pool_dev || !backing.deleted() || image_name.and_then(VolumeId::parse).is_none() {
                continue;
            }
            let mounts: Vec<_> = table.mounts_of_device(&device.path()).map(|m| m.mount_point.clone()).collect();
            if !mounts.is_empty() {
                report.problems.push(format!(
                    "{} holds the deleted image {name} and is still mounted at {mounts:?}; left alone",
                    device.path().display()
                ));
                continue;
            }
            self.detach_loop(device).map_err(|e| Error::internal("detaching a device of a deleted image", e))?;
            report.detached.push(format!("{} (its image {name} was deleted)", device.path().display()));
        }
        Ok(())
    }

    fn reconcile_volume(&self, mut record: VolumeRecord, seen: &Seen, report: &mut ReconcileReport) -> Result<()> {
        let id = record.id.clone();
        let _guard = self.locks.try_lock(id.as_str())?;
        let attached = self.image_metadata(&id)?.and_then(|image| seen.device_of(&image));
        let Some(staged) = record.staged.clone() else {
            if let Some(device) = attached
                && seen.table.mounts_of_device(&device.path()).next().is_none()
            {
                self.detach_loop(device).map_err(|e| Error::internal("detaching leaked device", e))?;
                report.detached.push(id.to_string());
            }
            return Ok(());
        };
        let mode = if staged.read_only { AccessMode::SingleNodeReaderOnly } else { AccessMode::SingleNodeWriter };
        let access_type = if staged.filesystem_mounted {
            AccessType::Mount {
                fs_type: None,
                mount_flags: staged.mount_flags.clone(),
                volume_mount_group: String::new(),
            }
        } else {
            AccessType::Block
        };
        // Staged as recorded (what `staged_at` checks, against the one reading).
        let in_place = attached.filter(|device| {
            !staged.filesystem_mounted
                || seen.table.top_mount_at(&staged.staging_path).is_some_and(|m| m.is_from(&device.path()))
        });
        if in_place.is_none() {
            self.stage_locked(&mut record, &staged.staging_path, &Capability { access_type, mode })?;
            failpoint::check("reconcile.restaged")?;
            report.restored.push(format!("{id} staged at {}", staged.staging_path.display()));
        } else if staged.filesystem_mounted && !staged.read_only {
            // A plinth that died while it held the filesystem frozen for a snapshot leaves it
            // frozen: every write in the pod would hang until someone thaws it.
            if self.host.thaw(&staged.staging_path).map_err(|e| Error::internal("thawing", e))? {
                report.restored.push(format!(
                    "{id} thawed at {} (frozen by an interrupted snapshot)",
                    staged.staging_path.display()
                ));
            }
        }
        // Only a volume staged again just now needs a fresh look at its device and mounts.
        let fresh;
        let (table, device) = match in_place {
            Some(device) => (&seen.table, device),
            None => {
                fresh = self.mount_table()?;
                let device =
                    self.attached_device(&id)?.ok_or_else(|| Error::internal("reconcile", "device vanished"))?;
                (&fresh, device)
            }
        };
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
            self.restore_publication(record.layout, &device.path(), &staged.staging_path, &target, &published)?;
            report.restored.push(format!("{id} published at {}", target.display()));
        }
        if changed {
            self.store.save(&record)?;
        }
        Ok(())
    }
}
