//! Publish (bind the staged filesystem or the device node at the target) and unpublish.

use std::path::{Path, PathBuf};

use super::{ensure_target, remove_target};
use crate::Engine;
use crate::caps::{AccessType, Capability};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::host::BindSource;
use crate::ids::VolumeId;
use crate::model::{Layout, Published};
use crate::mountopts;
use crate::paths::Pinned;
use crate::sys::mount::MsFlags;

/// The per-mount flags of a publication: what publish applies and what a restart restores, from
/// the same recorded facts, so a restored publication is exactly the one the CO asked for.
pub(super) fn bind_flags(layout: Layout, published: &Published, operator_allowed: &[String]) -> Result<MsFlags> {
    let fs = if published.block { None } else { layout.fs_type() };
    let mut flags = mountopts::parse(&published.mount_flags, fs, operator_allowed)?.flags;
    if published.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    Ok(flags)
}

impl Engine {
    pub fn publish_volume(
        &self,
        id: &VolumeId,
        staging_raw: &str,
        target_raw: &str,
        cap: &Capability,
        readonly: bool,
    ) -> Result<()> {
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.node_record(id)?;
        cap.check_layout(record.layout)?;
        let staging = self.paths.confine("staging_target_path", staging_raw)?;
        let target = self.paths.confine("target_path", target_raw)?;
        if target == staging {
            return Err(Error::InvalidArgument("target_path must differ from staging_target_path".into()));
        }
        let block = matches!(cap.access_type, AccessType::Block);
        let publication = Published {
            read_only: readonly || cap.mode.read_only(),
            block,
            mount_flags: match &cap.access_type {
                AccessType::Mount { mount_flags, .. } => mount_flags.clone(),
                AccessType::Block => Vec::new(),
            },
        };
        let flags = bind_flags(record.layout, &publication, &self.allowed_mount_options)?;

        let mut table = self.mount_table()?;
        let (device, restaged) = match self.staged_at(&record, &staging, &table)? {
            Some(device) => (device, None),
            None => {
                // Stage again (kubernetes#106729: publish without stage after a failed unstage).
                tracing::info!(volume_id = %id, "not staged at {}; staging again before publish", staging.display());
                let stage_cap = if block || record.layout == Layout::Block {
                    Capability { access_type: AccessType::Block, mode: cap.mode }
                } else {
                    cap.clone()
                };
                let done = self.stage_locked(&mut record, &staging, &stage_cap)?;
                table = self.mount_table()?;
                (done.device, Some(done))
            }
        };
        let result = (|| -> Result<()> {
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
                if same_device
                    && existing.is_read_only() == publication.read_only
                    && recorded.is_none_or(|p| p.block == block)
                {
                    if recorded.is_none() {
                        // Mounted by a publish that crashed before its record: record it now, so
                        // single-writer checks and restores know of it.
                        record.published.insert(target.clone(), publication.clone());
                        self.store.save(&record)?;
                    }
                    return Ok(());
                }
                return Err(Error::AlreadyExists(format!(
                    "target path {} is already published with a different configuration",
                    target.display()
                )));
            }
            let created = ensure_target(&target, block)?;
            failpoint::check("publish.target_ready")?;
            let bound = Pinned::open(&target).and_then(|pinned| {
                failpoint::check("publish.pinned")?;
                let device_path = device.path();
                let source_dir;
                let source = if block {
                    BindSource::Device(&device_path)
                } else {
                    source_dir = Pinned::open(&staging)?;
                    BindSource::Dir(&source_dir)
                };
                self.host.bind_mount(source, &pinned, flags).map_err(|e| Error::internal(format!("publishing {id}"), e))
            });
            if let Err(err) = bound {
                if created {
                    let _ = remove_target(&target);
                }
                return Err(err);
            }
            record.published.insert(target.clone(), publication.clone());
            if let Err(err) = failpoint::check("publish.bound").and_then(|()| self.store.save(&record)) {
                record.published.remove(&target);
                let _ = self.host.unmount(&target);
                if created {
                    let _ = remove_target(&target);
                }
                return Err(err);
            }
            tracing::info!(volume_id = %id, target = %target.display(), read_only = publication.read_only, block,
                "volume published");
            Ok(())
        })();
        if result.is_err()
            && let Some(done) = restaged
        {
            self.undo_stage(&done, &staging);
            self.forget_stage(&mut record, done);
        }
        result
    }

    pub fn unpublish_volume(&self, id: &VolumeId, target_raw: &str) -> Result<()> {
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.node_record(id)?;
        let target = self.paths.confine_existing("target_path", target_raw)?;
        let table = self.mount_table()?;
        if let Some(existing) = table.top_mount_at(&target) {
            let ours = record.published.contains_key(&target)
                || self.attached_device(id)?.is_some_and(|d| existing.is_from(&d.path()));
            if !ours {
                return Err(Error::FailedPrecondition(format!(
                    "target path {} holds a mount that is not volume {id}; leaving it alone",
                    target.display()
                )));
            }
            self.host.unmount(&target).map_err(|e| Error::internal(format!("unpublishing {id}"), e))?;
            failpoint::check("unpublish.unmounted")?;
        }
        remove_target(&target)?;
        if record.published.remove(&target).is_some() {
            self.store.save(&record)?;
        }
        tracing::info!(volume_id = %id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    /// Re-creates a recorded publication after a restart, with exactly the flags publish used.
    pub(super) fn restore_publication(
        &self,
        layout: Layout,
        device: &Path,
        staging: &Path,
        target: &Path,
        published: &Published,
    ) -> Result<()> {
        let flags = bind_flags(layout, published, &self.allowed_mount_options)?;
        let created = ensure_target(target, published.block)?;
        let bound = Pinned::open(target).and_then(|pinned| {
            let source_dir;
            let source = if published.block {
                BindSource::Device(device)
            } else {
                source_dir = Pinned::open(staging)?;
                BindSource::Dir(&source_dir)
            };
            self.host.bind_mount(source, &pinned, flags).map_err(|e| Error::internal("restoring publication", e))
        });
        if let Err(err) = bound {
            if created {
                let _ = remove_target(target);
            }
            return Err(err);
        }
        Ok(())
    }
}
