//! Node-side operations: stage (attach + format-if-blank + mount), publish (bind mount),
//! unpublish, unstage (unmount + detach), stats and health, and the start-up reconcile.
//!
//! Every operation looks before it acts: the mount table before mounting or unmounting, blkid
//! before mkfs, the loop devices' backing files before attaching. "Already done" is success, and
//! a failure undoes what the call itself did. All machine access goes through `Engine::host`.

mod health;
mod publish;
mod reconcile;
mod stage;
#[cfg(test)]
mod tests;

use std::path::Path;

pub use health::{VolumeMounts, VolumeStats};
pub use reconcile::ReconcileReport;

use crate::Engine;
use crate::error::{Context, Error, Result};
use crate::ids::VolumeId;
use crate::model::VolumeRecord;
use crate::sys::loopdev::LoopDevice;
use crate::sys::mountinfo::MountTable;

/// Creates `path` as a directory (filesystem) or an empty file (block device bind target).
/// Returns whether it was created here, so a failed call can remove it again.
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
    fn node_record(&self, id: &VolumeId) -> Result<VolumeRecord> {
        self.store
            .load(id)?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist on node {}", self.node_id)))
    }

    fn mount_table(&self) -> Result<MountTable> {
        self.host.mount_table().map_err(|e| Error::internal("reading the mount table", e))
    }

    /// The loop device the volume's image is attached to, if any (matched by inode: the path a
    /// device shows depends on the mount namespace that reads it).
    pub(crate) fn attached_device(&self, id: &VolumeId) -> Result<Option<LoopDevice>> {
        let Some(image) = self.image_metadata(id)? else { return Ok(None) };
        let devices =
            self.host.loop_devices().map_err(|e| Error::internal(format!("looking for the loop device of {id}"), e))?;
        Ok(devices.into_iter().find(|(_, backing)| backing.is(&image)).map(|(device, _)| device))
    }

    /// The image file's metadata (`None` when it is missing).
    pub(crate) fn image_metadata(&self, id: &VolumeId) -> Result<Option<std::fs::Metadata>> {
        let image = self.pool.image_path(id);
        match std::fs::metadata(&image) {
            Ok(metadata) => Ok(Some(metadata)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context(|| format!("inspecting {}", image.display())),
        }
    }
}
