//! Snapshots and group snapshots: point-in-time copies of volume images, taken with the source
//! filesystem frozen when it is mounted, so each copy is what a crash at that instant would leave.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::Engine;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::host::FrozenFs;
use crate::ids::{GroupSnapshotId, SnapshotId, VolumeId};
use crate::model::{GroupSnapshotRecord, SnapshotRecord, VolumeRecord};
use crate::store::Phase;
use crate::sys::copy::Copying;

/// A volume held still while its image is copied; released (thawed) on drop.
#[derive(Debug)]
pub(crate) enum Still {
    /// Not mounted writable here: nothing writes to its image.
    Idle,
    /// Mounted and flushed, still written to: only an atomic reflink may copy it.
    Flushed,
    /// Frozen until dropped (the guard thaws).
    Frozen { _thaws_on_drop: Box<dyn FrozenFs> },
}

impl Still {
    pub(crate) fn copying(&self) -> Copying {
        match self {
            Still::Flushed => Copying::ReflinkOnly,
            Still::Idle | Still::Frozen { .. } => Copying::ReflinkOrCopy,
        }
    }
}

fn now_precise() -> (i64, i32) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (now.as_secs() as i64, now.subsec_nanos() as i32)
}

fn require(what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    Ok(())
}

impl Engine {
    /// The staging mount of `record`'s filesystem, if it is mounted writable here.
    fn writable_mount<'r>(&self, record: &'r VolumeRecord) -> Result<Option<&'r std::path::Path>> {
        let Some(staged) = record.staged.as_ref().filter(|s| s.filesystem_mounted && !s.read_only) else {
            return Ok(None);
        };
        let table = self.host.mount_table().map_err(|e| Error::internal("reading the mount table", e))?;
        let mounted = table.top_mount_at(&staged.staging_path).is_some_and(|m| m.is_from(&staged.device));
        Ok(mounted.then_some(staged.staging_path.as_path()))
    }

    /// Holds one volume still for a copy of its image. On a pool that reflinks, the copy is a
    /// clone that waits for the loop device's in-flight direct I/O and holds off new writes
    /// until done, so it is one instant of the device, as a crash would leave it; flushing the
    /// filesystem first puts everything written before the request into that instant. A freeze
    /// would add nothing but its cost (an ext4 freeze checkpoints the whole journal: tens of
    /// milliseconds). A copying pool reads the image for seconds: the filesystem stays frozen.
    pub(crate) fn hold_still(&self, record: &VolumeRecord) -> Result<Still> {
        let Some(staging) = self.writable_mount(record)? else { return Ok(Still::Idle) };
        if !self.pool.shares_blocks() {
            return self.freeze(record, staging);
        }
        self.host.sync_filesystem(staging).map_err(|e| Error::internal(format!("flushing {}", record.id), e))?;
        Ok(Still::Flushed)
    }

    /// Freezes the volume's filesystem while the returned guard lives, if it is mounted here:
    /// members of a group are copied one after another and must all show the same instant.
    pub(crate) fn freeze_if_mounted(&self, record: &VolumeRecord) -> Result<Still> {
        match self.writable_mount(record)? {
            Some(staging) => self.freeze(record, staging),
            None => Ok(Still::Idle),
        }
    }

    fn freeze(&self, record: &VolumeRecord, staging: &std::path::Path) -> Result<Still> {
        self.host
            .freeze(staging)
            .map(|guard| Still::Frozen { _thaws_on_drop: guard })
            .map_err(|e| Error::internal(format!("quiescing {}", record.id), e))
    }

    /// Copies the image of `volume` (whose lock the caller holds, frozen if needed) into `id`:
    /// an intent record first, then the copy, then the record made ready (the commit).
    fn take_snapshot(
        &self,
        id: &SnapshotId,
        name: &str,
        volume: &VolumeRecord,
        group: Option<&GroupSnapshotId>,
        copying: Copying,
    ) -> Result<SnapshotRecord> {
        if !self.pool.image_exists(&volume.id) {
            return Err(Error::FailedPrecondition(format!("the image of volume {} is missing", volume.id)));
        }
        let (created_at_seconds, created_at_nanos) = now_precise();
        let mut record = SnapshotRecord {
            id: id.clone(),
            name: name.to_owned(),
            source_volume_id: volume.id.clone(),
            size_bytes: volume.capacity_bytes,
            layout: volume.layout,
            filesystem_bytes: volume.filesystem_bytes,
            created_at_seconds,
            created_at_nanos,
            group_snapshot_id: group.cloned(),
            copy_method: String::new(),
            loop_block_size: volume.loop_block_size,
            phase: Phase::Creating,
        };
        self.snapshots.save(&record)?;
        let taken = (|| -> Result<()> {
            failpoint::check("snapshot.intent_saved")?;
            let method = self.pool.copy_to_snapshot(&self.pool.image_path(&volume.id), id, copying)?;
            failpoint::check("snapshot.copied")?;
            record.copy_method = method.as_str().to_owned();
            record.phase = Phase::Ready;
            self.snapshots.save(&record)
        })();
        if let Err(err) = taken {
            let _ = self.undo_snapshot(id);
            return Err(self.pool_full_or(err));
        }
        tracing::info!(snapshot_id = %id, volume_id = %volume.id, method = %record.copy_method, "snapshot taken");
        Ok(record)
    }

    /// Removes what an unfinished snapshot creation or deletion left: image and record.
    pub(crate) fn undo_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.pool.remove_snapshot_image(id)?;
        self.snapshots.remove(id)
    }

    fn source_volume(&self, raw: &str) -> Result<(VolumeId, VolumeRecord)> {
        let id =
            VolumeId::parse(raw).ok_or_else(|| Error::NotFound(format!("source volume {raw:?} does not exist")))?;
        let record =
            self.store.load(&id)?.ok_or_else(|| Error::NotFound(format!("source volume {id} does not exist")))?;
        Ok((id, record))
    }

    pub fn create_snapshot(&self, name: &str, source_volume_id: &str) -> Result<SnapshotRecord> {
        require("name", name)?;
        require("source_volume_id", source_volume_id)?;
        let id = SnapshotId::for_name(name);
        let _snapshot_guard = self.locks.try_lock(id.as_str())?;
        if let Some(interrupted) = self.snapshots.load_any(&id)?.filter(|s| !s.phase.is_ready()) {
            self.undo_snapshot(&interrupted.id)?;
        }
        if let Some(existing) = self.snapshots.load(&id)? {
            if existing.source_volume_id.as_str() == source_volume_id {
                return Ok(existing);
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot {name:?} already exists for volume {}, not {source_volume_id}",
                existing.source_volume_id
            )));
        }
        let (volume_id, _) = self.source_volume(source_volume_id)?;
        let _volume_guard = self.locks.try_lock(volume_id.as_str())?;
        let (_, volume) = self.source_volume(source_volume_id)?;
        let still = self.hold_still(&volume)?;
        let copying = still.copying();
        let result =
            failpoint::check("snapshot.frozen").and_then(|()| self.take_snapshot(&id, name, &volume, None, copying));
        drop(still);
        result
    }

    pub fn delete_snapshot(&self, raw_id: &str) -> Result<()> {
        require("snapshot_id", raw_id)?;
        let Some(id) = SnapshotId::parse(raw_id) else { return Ok(()) };
        let _guard = self.locks.try_lock(id.as_str())?;
        if let Some(record) = self.snapshots.load(&id)?
            && let Some(group) = &record.group_snapshot_id
            && self.groups.load(group)?.is_some()
        {
            return Err(Error::InvalidArgument(format!(
                "snapshot {id} is part of group snapshot {group}; delete the group snapshot instead"
            )));
        }
        let Some(mut record) = self.snapshots.load_any(&id)? else {
            return self.pool.remove_snapshot_image(&id);
        };
        record.phase = Phase::Deleting;
        self.snapshots.save(&record)?;
        failpoint::check("snapshot_delete.intent_saved")?;
        self.undo_snapshot(&id)
    }

    pub fn snapshot(&self, raw_id: &str) -> Result<SnapshotRecord> {
        require("snapshot_id", raw_id)?;
        SnapshotId::parse(raw_id)
            .map(|id| self.snapshots.load(&id))
            .transpose()?
            .flatten()
            .ok_or_else(|| Error::NotFound(format!("snapshot {raw_id:?} does not exist")))
    }

    /// One page of snapshots in ID order, optionally filtered by snapshot or source volume.
    pub fn list_snapshots(
        &self,
        starting_token: &str,
        max_entries: i32,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<(Vec<SnapshotRecord>, String)> {
        let matching: Vec<SnapshotRecord> = self
            .snapshots
            .list()?
            .into_iter()
            .filter(|s| snapshot_id.is_empty() || s.id.as_str() == snapshot_id)
            .filter(|s| source_volume_id.is_empty() || s.source_volume_id.as_str() == source_volume_id)
            .collect();
        crate::page::page(matching, |s: &SnapshotRecord| &s.id, starting_token, max_entries)
    }

    /// Freezes every mounted member, snapshots them all, then thaws: one crash-consistent group.
    pub fn create_group_snapshot(
        &self,
        name: &str,
        source_volume_ids: &[String],
    ) -> Result<(GroupSnapshotRecord, Vec<SnapshotRecord>)> {
        require("name", name)?;
        if source_volume_ids.is_empty() {
            return Err(Error::InvalidArgument("source_volume_ids is required".into()));
        }
        let id = GroupSnapshotId::for_name(name);
        let _group_guard = self.locks.try_lock(id.as_str())?;
        if let Some(interrupted) = self.groups.load_any(&id)?.filter(|g| !g.phase.is_ready()) {
            self.undo_group(&interrupted)?;
        }
        let wanted: BTreeSet<&str> = source_volume_ids.iter().map(String::as_str).collect();
        if let Some(existing) = self.groups.load(&id)? {
            let have: BTreeSet<&str> = existing.source_volume_ids.iter().map(VolumeId::as_str).collect();
            if have != wanted {
                return Err(Error::AlreadyExists(format!(
                    "group snapshot {name:?} already exists with different source volumes"
                )));
            }
            let members = self.group_members(&existing)?;
            return Ok((existing, members));
        }
        let mut volume_ids = Vec::new();
        for raw in &wanted {
            volume_ids.push(self.source_volume(raw)?.0);
        }
        let _volume_guards = volume_ids.iter().map(|v| self.locks.try_lock(v.as_str())).collect::<Result<Vec<_>>>()?;
        let volumes =
            volume_ids.iter().map(|v| self.source_volume(v.as_str()).map(|(_, r)| r)).collect::<Result<Vec<_>>>()?;

        let (created_at_seconds, created_at_nanos) = now_precise();
        let member_ids: Vec<SnapshotId> =
            volume_ids.iter().map(|v| SnapshotId::for_name(&format!("{id}/{v}"))).collect();
        let mut group = GroupSnapshotRecord {
            id: id.clone(),
            name: name.to_owned(),
            source_volume_ids: volume_ids.clone(),
            snapshot_ids: member_ids,
            created_at_seconds,
            created_at_nanos,
            phase: Phase::Creating,
        };
        self.groups.save(&group)?;
        let frozen = volumes.iter().map(|v| self.freeze_if_mounted(v)).collect::<Result<Vec<_>>>();
        let frozen = match frozen {
            Ok(frozen) => frozen,
            Err(err) => {
                let _ = self.undo_group(&group);
                return Err(err);
            }
        };
        let mut taken = Vec::new();
        for (volume, snapshot_id) in volumes.iter().zip(group.snapshot_ids.clone()) {
            let step = failpoint::check("group.member").and_then(|()| {
                let member = format!("{name}-{}", volume.id);
                self.take_snapshot(&snapshot_id, &member, volume, Some(&id), Copying::ReflinkOrCopy)
            });
            match step {
                Ok(record) => taken.push(record),
                Err(err) => {
                    drop(frozen);
                    let _ = self.undo_group(&group);
                    return Err(err);
                }
            }
        }
        drop(frozen);
        group.phase = Phase::Ready;
        if let Err(err) = failpoint::check("group.members_taken").and_then(|()| self.groups.save(&group)) {
            let _ = self.undo_group(&group);
            return Err(err);
        }
        tracing::info!(group_snapshot_id = %id, members = taken.len(), "group snapshot taken");
        Ok((group, taken))
    }

    /// Removes an unfinished group: every member it may have taken, then its record.
    pub(crate) fn undo_group(&self, group: &GroupSnapshotRecord) -> Result<()> {
        for member in &group.snapshot_ids {
            self.undo_snapshot(member)?;
        }
        self.groups.remove(&group.id)
    }

    fn group_members(&self, group: &GroupSnapshotRecord) -> Result<Vec<SnapshotRecord>> {
        let mut members = Vec::new();
        for id in &group.snapshot_ids {
            members.push(self.snapshots.load(id)?.ok_or_else(|| {
                Error::internal(format!("group snapshot {}", group.id), format!("member {id} is missing"))
            })?);
        }
        Ok(members)
    }

    fn check_member_list(group: &GroupSnapshotRecord, snapshot_ids: &[String]) -> Result<()> {
        if snapshot_ids.is_empty() {
            return Ok(());
        }
        let given: BTreeSet<&str> = snapshot_ids.iter().map(String::as_str).collect();
        let have: BTreeSet<&str> = group.snapshot_ids.iter().map(SnapshotId::as_str).collect();
        if given != have {
            return Err(Error::InvalidArgument(format!(
                "snapshot_ids do not match the members of group snapshot {}",
                group.id
            )));
        }
        Ok(())
    }

    pub fn group_snapshot(
        &self,
        raw_id: &str,
        snapshot_ids: &[String],
    ) -> Result<(GroupSnapshotRecord, Vec<SnapshotRecord>)> {
        require("group_snapshot_id", raw_id)?;
        let group = GroupSnapshotId::parse(raw_id)
            .map(|id| self.groups.load(&id))
            .transpose()?
            .flatten()
            .ok_or_else(|| Error::NotFound(format!("group snapshot {raw_id:?} does not exist")))?;
        Self::check_member_list(&group, snapshot_ids)?;
        let members = self.group_members(&group)?;
        Ok((group, members))
    }

    pub fn delete_group_snapshot(&self, raw_id: &str, snapshot_ids: &[String]) -> Result<()> {
        require("group_snapshot_id", raw_id)?;
        let Some(id) = GroupSnapshotId::parse(raw_id) else { return Ok(()) };
        let _guard = self.locks.try_lock(id.as_str())?;
        let Some(mut group) = self.groups.load_any(&id)? else { return Ok(()) };
        if group.phase.is_ready() {
            Self::check_member_list(&group, snapshot_ids)?;
        }
        group.phase = Phase::Deleting;
        self.groups.save(&group)?;
        failpoint::check("group_delete.intent_saved")?;
        self.undo_group(&group)?;
        tracing::info!(group_snapshot_id = %id, "group snapshot deleted");
        Ok(())
    }
}
