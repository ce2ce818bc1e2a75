//! Controller-side operations on the local pool: create, delete, list, capacity.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::Engine;
use crate::caps::{AccessType, Capability};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::ids::SnapshotId;
use crate::ids::VolumeId;
use crate::mkfsopts;
use crate::model::{ContentSource, FsType, Layout, MutableParameters, Provisioning, VolumeParameters, VolumeRecord};
use crate::pool::Capacity;
use crate::size::{MIB, resolve_capacity};
use crate::snapshots::Still;
use crate::store::Phase;

const MAX_NAME_LEN: usize = 1024;

#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    pub required_bytes: i64,
    pub limit_bytes: i64,
    pub capabilities: Vec<Capability>,
    pub parameters: VolumeParameters,
    /// Nodes the volume must be accessible from (`None`: no requirement).
    pub requisite_nodes: Option<Vec<String>>,
    /// Raw IDs as the CO sent them; unknown or malformed ones are NOT_FOUND.
    pub content_source: Option<SourceRequest>,
    pub mutable_parameters: MutableParameters,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRequest {
    Snapshot(String),
    Volume(String),
}

/// What a new volume is copied from, once looked up.
struct Source {
    reference: ContentSource,
    image: std::path::PathBuf,
    size_bytes: u64,
    layout: Layout,
    filesystem_bytes: u64,
    /// A copy keeps its source's geometry (`None`: unknown, found out at its first stage).
    loop_block_size: Option<u32>,
}

/// The layout a create request asks for: a filesystem if any capability mounts it. The flag
/// says whether the filesystem was named explicitly (rather than defaulted to ext4).
fn layout_for(request: &CreateVolume) -> Result<(Layout, bool)> {
    let mut mount_fs: Option<FsType> = None;
    let mut mounted = false;
    for cap in &request.capabilities {
        if let AccessType::Mount { fs_type, .. } = &cap.access_type {
            mounted = true;
            if let Some(fs) = fs_type {
                if mount_fs.is_some_and(|seen| seen != *fs) {
                    return Err(Error::InvalidArgument("volume capabilities ask for different filesystems".into()));
                }
                mount_fs = Some(*fs);
            }
        }
    }
    if !mounted {
        return Ok((Layout::Block, false));
    }
    let fs_type = match (mount_fs, request.parameters.fs_type) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::InvalidArgument(format!(
                "capability fs_type {} conflicts with parameter fsType {}",
                a.as_str(),
                b.as_str()
            )));
        }
        (Some(fs), _) | (None, Some(fs)) => return Ok((Layout::Filesystem { fs_type: fs }, true)),
        (None, None) => FsType::Ext4,
    };
    Ok((Layout::Filesystem { fs_type }, false))
}

/// A copy keeps its source's layout; the request may only restate it.
fn layout_from_source(requested: Layout, explicit: bool, source: Layout) -> Result<Layout> {
    match (requested, source) {
        (Layout::Block, Layout::Block) | (Layout::Block, Layout::Filesystem { .. }) if requested == source => {
            Ok(source)
        }
        (Layout::Filesystem { fs_type }, Layout::Filesystem { fs_type: source_fs })
            if !explicit || fs_type == source_fs =>
        {
            Ok(source)
        }
        _ => Err(Error::InvalidArgument(format!(
            "the content source is {source:?}; a volume copied from it cannot be {requested:?}"
        ))),
    }
}

/// A filesystem that will have to grow to `size` can: the kernel grows btrfs only to 256 MiB or
/// more, and a volume whose filesystem can never catch up with its size fails every stage.
fn check_growable(id: &VolumeId, layout: Layout, filesystem_bytes: u64, size: u64) -> Result<()> {
    let Some(fs) = layout.fs_type() else { return Ok(()) };
    let floor = fs.smallest_growth_target();
    if filesystem_bytes == 0 || size <= filesystem_bytes || size >= floor {
        return Ok(());
    }
    Err(Error::OutOfRange(format!(
        "volume {id} holds a {} filesystem of {filesystem_bytes} bytes, which the kernel grows only to {floor} \
         bytes or more: ask for at least that",
        fs.as_str()
    )))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Engine {
    pub fn create_volume(&self, request: &CreateVolume) -> Result<VolumeRecord> {
        if request.name.is_empty() {
            return Err(Error::InvalidArgument("name is required".into()));
        }
        if request.name.len() > MAX_NAME_LEN {
            return Err(Error::InvalidArgument(format!("name is longer than {MAX_NAME_LEN} bytes")));
        }
        if request.capabilities.is_empty() {
            return Err(Error::InvalidArgument("volume_capabilities is required".into()));
        }
        let (requested_layout, explicit_fs) = layout_for(request)?;
        if let Some(nodes) = &request.requisite_nodes
            && !nodes.iter().any(|n| n == &self.node_id)
        {
            return Err(Error::ResourceExhausted(format!(
                "accessibility requirements exclude node {}, the only node this plinth serves",
                self.node_id
            )));
        }
        let provisioning = request.mutable_parameters.provisioning.unwrap_or(request.parameters.provisioning);
        let id = VolumeId::for_name(&request.name);
        let _guard = self.locks.try_lock(id.as_str())?;

        // The source volume's lock is held through the copy, so it cannot change underneath.
        let (source, _source_guard) = match &request.content_source {
            None => (None, None),
            Some(wanted) => {
                let (source, guard) = self.lookup_source(wanted)?;
                (Some(source), guard)
            }
        };
        let layout = match &source {
            Some(source) => layout_from_source(requested_layout, explicit_fs, source.layout)?,
            None => requested_layout,
        };
        if let (Layout::Filesystem { fs_type }, None) = (layout, &source) {
            self.require_tools(fs_type, true, false)?;
        }
        let mkfs_options = match (&request.parameters.mkfs_options, layout) {
            (None, _) => Vec::new(),
            (Some(options), Layout::Filesystem { fs_type }) => mkfsopts::parse(options, fs_type)?,
            (Some(_), Layout::Block) => {
                return Err(Error::InvalidArgument("mkfsOptions makes no sense for a block volume".into()));
            }
        };
        let minimum =
            layout.fs_type().map_or(MIB, FsType::minimum_bytes).max(source.as_ref().map_or(0, |s| s.size_bytes));
        let size = resolve_capacity(request.required_bytes, request.limit_bytes, self.default_volume_size, minimum)?;
        check_growable(&id, layout, source.as_ref().map_or(0, |s| s.filesystem_bytes), size)?;

        match self.store.load_any(&id)? {
            Some(existing) if existing.phase.is_ready() => {
                return self.check_compatible(
                    existing,
                    request,
                    layout,
                    provisioning,
                    source.as_ref().map(|s| &s.reference),
                );
            }
            // A creation or deletion a crash interrupted (nobody was told it succeeded): clear it.
            Some(interrupted) => self.undo_volume(&interrupted.id)?,
            None => {}
        }
        let still = match (&source, &request.content_source) {
            (Some(_), Some(SourceRequest::Volume(raw))) => {
                let record = self.store.load(&VolumeId::parse(raw).expect("looked up above"))?;
                match record {
                    Some(record) => self.hold_still(&record)?,
                    None => Still::Idle,
                }
            }
            _ => Still::Idle,
        };
        let copying = still.copying();
        let reservation = self.reserve(size, || format!("volume {}", request.name))?;
        let mut record = VolumeRecord {
            id: id.clone(),
            name: request.name.clone(),
            capacity_bytes: size,
            layout,
            provisioning,
            created_at: now(),
            staged: None,
            published: Default::default(),
            content_source: source.as_ref().map(|s| s.reference.clone()),
            filesystem_bytes: source.as_ref().map_or(0, |s| s.filesystem_bytes),
            mkfs_options,
            loop_block_size: match &source {
                Some(source) => source.loop_block_size,
                None => Some(crate::sys::loopdev::LOGICAL_BLOCK_SIZE),
            },
            filesystem_usable_bytes: None,
            phase: Phase::Creating,
        };
        // The intent first: a crash from here on leaves a record that says "undo me".
        self.store.save(&record)?;
        let made = (|| -> Result<()> {
            failpoint::check("create.intent_saved")?;
            match &source {
                None => self.pool.create_image(&id, size, provisioning)?,
                Some(source) => {
                    let method = self.pool.create_image_from(&source.image, &id, size, provisioning, copying)?;
                    tracing::info!(volume_id = %id, method = method.as_str(), "volume data copied from its source");
                }
            }
            failpoint::check("create.image_made")?;
            record.phase = Phase::Ready;
            self.store.save(&record)
        })();
        drop(still);
        if let Err(err) = made {
            let _ = self.undo_volume(&id);
            return Err(self.pool_full_or(err));
        }
        drop(reservation);
        tracing::info!(volume_id = %id, name = %record.name, size, layout = ?layout, "volume created");
        Ok(record)
    }

    /// Removes what an unfinished creation or deletion left: the image (or its partial copy) and
    /// the intent record.
    pub(crate) fn undo_volume(&self, id: &VolumeId) -> Result<()> {
        self.pool.remove_image(id)?;
        self.store.remove(id)
    }

    fn lookup_source(&self, wanted: &SourceRequest) -> Result<(Source, Option<crate::locks::OperationGuard>)> {
        match wanted {
            SourceRequest::Snapshot(raw) => {
                let snapshot = SnapshotId::parse(raw)
                    .map(|id| self.snapshots.load(&id))
                    .transpose()?
                    .flatten()
                    .ok_or_else(|| Error::NotFound(format!("source snapshot {raw:?} does not exist")))?;
                Ok((
                    Source {
                        image: self.pool.snapshot_path(&snapshot.id),
                        reference: ContentSource::Snapshot(snapshot.id),
                        size_bytes: snapshot.size_bytes,
                        layout: snapshot.layout,
                        filesystem_bytes: snapshot.filesystem_bytes,
                        loop_block_size: snapshot.loop_block_size,
                    },
                    None,
                ))
            }
            SourceRequest::Volume(raw) => {
                let id = VolumeId::parse(raw)
                    .ok_or_else(|| Error::NotFound(format!("source volume {raw:?} does not exist")))?;
                let guard = self.locks.try_lock(id.as_str())?;
                let volume = self
                    .store
                    .load(&id)?
                    .ok_or_else(|| Error::NotFound(format!("source volume {id} does not exist")))?;
                Ok((
                    Source {
                        image: self.pool.image_path(&id),
                        reference: ContentSource::Volume(id),
                        size_bytes: volume.capacity_bytes,
                        layout: volume.layout,
                        filesystem_bytes: volume.filesystem_bytes,
                        loop_block_size: volume.loop_block_size,
                    },
                    Some(guard),
                ))
            }
        }
    }

    fn check_compatible(
        &self,
        existing: VolumeRecord,
        request: &CreateVolume,
        layout: Layout,
        provisioning: Provisioning,
        source: Option<&ContentSource>,
    ) -> Result<VolumeRecord> {
        let size = existing.capacity_bytes;
        let required = request.required_bytes.max(0) as u64;
        let limit = request.limit_bytes.max(0) as u64;
        let mismatch = if size < required || (limit > 0 && size > limit) {
            Some(format!("its size {size} is outside the requested range [{required}, {limit}]"))
        } else if existing.layout != layout {
            Some(format!("it was created as {:?}, the request asks for {layout:?}", existing.layout))
        } else if existing.provisioning != provisioning {
            Some(format!("it is {} provisioned", existing.provisioning.as_str()))
        } else if existing.content_source.as_ref() != source {
            Some(format!("it was created from {:?}", existing.content_source))
        } else {
            None
        };
        match mismatch {
            Some(why) => Err(Error::AlreadyExists(format!(
                "a volume named {:?} already exists ({}) and is incompatible: {why}",
                existing.name, existing.id
            ))),
            None => Ok(existing),
        }
    }

    /// Grows a volume's image. Returns the new size and whether the node must act (grow the
    /// filesystem, refresh the loop device). Shrinking is OUT_OF_RANGE.
    pub fn expand_volume(&self, raw_id: &str, required: i64, limit: i64) -> Result<(u64, bool)> {
        if raw_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let id = VolumeId::parse(raw_id).ok_or_else(|| Error::NotFound(format!("volume {raw_id:?} does not exist")))?;
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.store.load(&id)?.ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        let current = record.capacity_bytes;
        let wanted = resolve_capacity(required, limit, current, MIB)?;
        if limit > 0 && (limit as u64) < current {
            return Err(Error::OutOfRange(format!(
                "volume {id} is {current} bytes; plinth cannot shrink it to at most {limit}"
            )));
        }
        let needs_node = record.layout != Layout::Block || record.staged.is_some();
        if wanted <= current {
            return Ok((current, needs_node));
        }
        check_growable(&id, record.layout, record.filesystem_bytes, wanted)?;
        let reservation = self.reserve(wanted - current, || format!("growing {id}"))?;
        self.pool.grow_image(&id, wanted, record.provisioning).map_err(|e| self.pool_full_or(e))?;
        failpoint::check("expand.image_grown")?;
        record.capacity_bytes = wanted;
        self.store.save(&record)?;
        drop(reservation);
        tracing::info!(volume_id = %id, from = current, to = wanted, "volume expanded");
        Ok((wanted, needs_node))
    }

    /// Applies mutable parameters (VolumeAttributesClass): `provisioning: thick` preallocates.
    pub fn modify_volume(&self, raw_id: &str, changes: MutableParameters) -> Result<()> {
        if raw_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let id = VolumeId::parse(raw_id).ok_or_else(|| Error::NotFound(format!("volume {raw_id:?} does not exist")))?;
        let _guard = self.locks.try_lock(id.as_str())?;
        let mut record = self.store.load(&id)?.ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        match (changes.provisioning, record.provisioning) {
            (None, _)
            | (Some(Provisioning::Thin), Provisioning::Thin)
            | (Some(Provisioning::Thick), Provisioning::Thick) => Ok(()),
            (Some(Provisioning::Thick), Provisioning::Thin) => {
                self.pool
                    .grow_image(&id, record.capacity_bytes, Provisioning::Thick)
                    .map_err(|e| self.pool_full_or(e))?;
                failpoint::check("modify.preallocated")?;
                record.provisioning = Provisioning::Thick;
                self.store.save(&record)?;
                tracing::info!(volume_id = %id, "volume preallocated (now thick)");
                Ok(())
            }
            (Some(Provisioning::Thin), Provisioning::Thick) => Err(Error::InvalidArgument(format!(
                "volume {id} is thick: its blocks are allocated and plinth does not release them"
            ))),
        }
    }

    /// Deletes the volume's image and record. Unknown IDs succeed (already gone). A volume that is
    /// staged, published or still attached is refused: storage never vanishes under a pod.
    pub fn delete_volume(&self, raw_id: &str) -> Result<()> {
        if raw_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let Some(id) = VolumeId::parse(raw_id) else {
            return Ok(());
        };
        let _guard = self.locks.try_lock(id.as_str())?;
        let record = self.store.load(&id)?;
        if let Some(record) = &record
            && let Some(staged) = &record.staged
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is staged at {}{}; unpublish and unstage it before deleting",
                staged.staging_path.display(),
                if record.published.is_empty() {
                    String::new()
                } else {
                    format!(" and published at {:?}", record.published.keys().collect::<Vec<_>>())
                }
            )));
        }
        if let Some(device) = self.attached_device(&id)? {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still attached as {}; unstage it before deleting",
                device.path().display()
            )));
        }
        let Some(mut record) = record.or(self.store.load_any(&id)?) else {
            // No record: at most a stray image of an interrupted create.
            return self.pool.remove_image(&id);
        };
        record.phase = Phase::Deleting;
        self.store.save(&record)?;
        failpoint::check("delete.intent_saved")?;
        self.pool.remove_image(&id)?;
        failpoint::check("delete.image_removed")?;
        self.store.remove(&id)?;
        tracing::info!(volume_id = %id, "volume deleted");
        Ok(())
    }

    /// `None` for IDs plinth never issued or that were deleted.
    pub fn volume(&self, raw_id: &str) -> Result<Option<VolumeRecord>> {
        match VolumeId::parse(raw_id) {
            Some(id) => self.store.load(&id),
            None => Ok(None),
        }
    }

    pub fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        self.store.load(&VolumeId::for_name(name))
    }

    /// One page of volumes in ID order, starting after `starting_token` (the last ID of the
    /// previous page, so deletions between pages never skip or repeat entries).
    pub fn list_volumes(&self, starting_token: &str, max_entries: i32) -> Result<(Vec<VolumeRecord>, String)> {
        crate::page::page(self.store.list()?, |r: &VolumeRecord| &r.id, starting_token, max_entries)
    }

    /// Capacity of this node's pool. `for_node` is the node a topology segment names, if any.
    pub fn capacity(&self, for_node: Option<&str>) -> Result<Capacity> {
        let capacity = self.pool_capacity()?;
        if for_node.is_some_and(|n| n != self.node_id) {
            return Ok(Capacity { available_bytes: 0, ..capacity });
        }
        Ok(capacity)
    }
}
