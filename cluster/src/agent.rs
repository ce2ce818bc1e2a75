//! The node agent: reconciles the `Volume` objects assigned to this node into image files in the
//! local pool (create — blank, or copied from a snapshot or volume in this pool —, grow,
//! preallocate when the Volume turns thick, delete behind a finalizer) and reports their status.
//! Its snapshots are `agent_snapshots`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, Event, finalizer};
use kube::runtime::watcher;
use plinth_controller::metrics::Metrics;
use plinth_engine::caps::{AccessMode, AccessType, Capability};
use plinth_engine::failpoint;
use plinth_engine::model::{ContentSource, Layout, MutableParameters, Provisioning, VolumeParameters, VolumeRecord};
use plinth_engine::volumes::{CreateVolume, SourceRequest};
use plinth_engine::{Engine, Error as EngineError, VolumeId};

use crate::backoff::Backoff;
use crate::crd::{Phase, Volume, VolumeSource, VolumeSpec, VolumeStatus, reason};
use crate::keys::{IMAGE_FINALIZER, NODE_LABEL};
use crate::volumes;
use crate::{Error, Result};

pub struct Agent {
    pub client: kube::Client,
    pub engine: Arc<Engine>,
    /// Woken after every change so capacity is republished promptly.
    pub changed: Arc<tokio::sync::Notify>,
    pub metrics: Arc<Metrics>,
    /// Error retries of Volumes, Snapshots and GroupSnapshots (one history per object).
    pub backoff: Backoff,
}

impl Agent {
    pub fn new(
        client: kube::Client,
        engine: Arc<Engine>,
        changed: Arc<tokio::sync::Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            engine,
            changed,
            metrics,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(60)),
        }
    }
}

fn create_request(name: &str, spec: &VolumeSpec) -> CreateVolume {
    let access_type = match spec.layout() {
        Layout::Block => AccessType::Block,
        Layout::Filesystem { fs_type } => {
            AccessType::Mount { fs_type: Some(fs_type), mount_flags: Vec::new(), volume_mount_group: String::new() }
        }
    };
    CreateVolume {
        name: name.to_owned(),
        required_bytes: spec.size_bytes,
        limit_bytes: 0,
        capabilities: vec![Capability { access_type, mode: AccessMode::SingleNodeWriter }],
        parameters: VolumeParameters {
            fs_type: None,
            provisioning: spec.provisioning,
            mkfs_options: spec.mkfs_options.clone(),
        },
        requisite_nodes: None,
        content_source: spec.content_source.as_ref().map(|source| match source {
            VolumeSource::Snapshot(id) => SourceRequest::Snapshot(id.clone()),
            VolumeSource::Volume(id) => SourceRequest::Volume(id.clone()),
        }),
        mutable_parameters: MutableParameters::default(),
    }
}

fn as_volume_source(source: &ContentSource) -> VolumeSource {
    match source {
        ContentSource::Snapshot(id) => VolumeSource::Snapshot(id.to_string()),
        ContentSource::Volume(id) => VolumeSource::Volume(id.to_string()),
    }
}

/// Whether an existing image named like the Volume is this Volume's image. Expected
/// differences: the Volume has grown since (the image is grown), or turned thick (its blocks are
/// preallocated in place). Anything else — another layout, a thick image for a thin Volume (plinth
/// never releases allocated blocks), another content source — is not this Volume's image, and
/// says why.
pub fn foreign_image(existing: &VolumeRecord, spec: &VolumeSpec) -> Option<String> {
    let source = existing.content_source.as_ref().map(as_volume_source);
    if existing.layout != spec.layout() {
        Some(format!("it was made as {:?}, the Volume asks for {:?}", existing.layout, spec.layout()))
    } else if existing.provisioning == Provisioning::Thick && spec.provisioning == Provisioning::Thin {
        Some("it is thick provisioned, the Volume asks for thin: plinth does not release allocated blocks".into())
    } else if source != spec.content_source {
        Some(format!("it was made from {source:?}, the Volume asks for {:?}", spec.content_source))
    } else {
        None
    }
}

/// Makes (or finds) the image, grows it to the Volume's size and preallocates it when the Volume
/// is thick; returns the volume ID, capacity and allocated bytes. An image that exists is never
/// made again: its source (a snapshot, say) may be gone by now, and the copy is done.
fn make_image(engine: &Engine, name: &str, spec: &VolumeSpec) -> plinth_engine::Result<(VolumeId, u64, u64)> {
    let adopt = |existing: VolumeRecord| match foreign_image(&existing, spec) {
        Some(reason) => Err(EngineError::AlreadyExists(format!(
            "this node already has a volume named {name} ({}) that is not this Volume's image: {reason}",
            existing.id
        ))),
        None => Ok(existing),
    };
    let record = match engine.volume_by_name(name)? {
        Some(existing) => adopt(existing)?,
        None => match engine.create_volume(&create_request(name, spec)) {
            Ok(record) => record,
            Err(EngineError::AlreadyExists(why)) => {
                adopt(engine.volume_by_name(name)?.ok_or_else(|| EngineError::internal("volume vanished", why))?)?
            }
            Err(other) => return Err(other),
        },
    };
    if record.provisioning == Provisioning::Thin && spec.provisioning == Provisioning::Thick {
        let thick = MutableParameters { provisioning: Some(Provisioning::Thick) };
        engine.modify_volume(record.id.as_str(), thick)?;
    }
    let mut capacity = record.capacity_bytes;
    if (capacity as i64) < spec.size_bytes {
        capacity = engine.expand_volume(record.id.as_str(), spec.size_bytes, 0)?.0;
    }
    let allocated = engine.allocated_bytes(&record.id);
    Ok((record.id, capacity, allocated))
}

async fn apply(volume: &Volume, agent: &Agent) -> Result<Action> {
    let name = volume.name_any();
    volumes::ensure_volume_id_label(&agent.client, volume).await?;
    let engine = Arc::clone(&agent.engine);
    let (image_name, spec) = (name.clone(), volume.spec.clone());
    let outcome = tokio::task::spawn_blocking(move || make_image(&engine, &image_name, &spec)).await?;
    failpoint::check("agent.image_ready")?;
    let generation = volume.metadata.generation;
    match outcome {
        Ok((volume_id, capacity, allocated)) => {
            let status = VolumeStatus {
                phase: Some(Phase::Ready),
                volume_id: Some(volume_id.to_string()),
                capacity_bytes: Some(capacity as i64),
                allocated_bytes: Some(allocated as i64),
                message: None,
                reason: None,
                observed_generation: generation,
            };
            if volume.status.as_ref() != Some(&status) {
                volumes::set_status(&agent.client, &name, &status).await?;
            }
            Ok(Action::requeue(Duration::from_secs(300)))
        }
        Err(
            err @ (EngineError::ResourceExhausted(_)
            | EngineError::OutOfRange(_)
            | EngineError::InvalidArgument(_)
            | EngineError::AlreadyExists(_)),
        ) => {
            let status = VolumeStatus {
                phase: Some(Phase::Failed),
                message: Some(err.chain()),
                reason: reason::of(err.code()).map(str::to_owned),
                observed_generation: generation,
                ..current(volume)
            };
            if volume.status.as_ref() != Some(&status) {
                volumes::set_status(&agent.client, &name, &status).await?;
            }
            // Reported; retried with backoff in case the cause goes away (space freed, say).
            Err(err.into())
        }
        Err(err) => Err(err.into()),
    }
}

/// Removes the image. Tolerates one that was never made; refuses while it is staged or
/// published on this node (the finalizer stays, the status says why, the runtime retries).
async fn cleanup(volume: &Volume, agent: &Agent) -> Result<Action> {
    let name = volume.name_any();
    let engine = Arc::clone(&agent.engine);
    let id = VolumeId::for_name(&name);
    match tokio::task::spawn_blocking(move || engine.delete_volume(id.as_str())).await? {
        Ok(()) => {
            failpoint::check("agent.image_deleted")?;
            tracing::info!(volume = %name, "image deleted");
            Ok(Action::await_change())
        }
        Err(EngineError::FailedPrecondition(why)) => {
            let status = VolumeStatus {
                phase: Some(Phase::Deleting),
                message: Some(why.clone()),
                reason: None,
                ..current(volume)
            };
            if volume.status.as_ref() != Some(&status) {
                volumes::set_status(&agent.client, &name, &status).await?;
            }
            Err(Error::InUse(why))
        }
        Err(err) => Err(err.into()),
    }
}

async fn reconcile(volume: Arc<Volume>, agent: Arc<Agent>) -> Result<Action> {
    if volume.spec.node != agent.engine.node_id() {
        return Ok(Action::await_change());
    }
    let object = Arc::clone(&volume);
    let api = volumes::api(&agent.client);
    let result = finalizer(&api, IMAGE_FINALIZER, volume, |event| async {
        match event {
            Event::Apply(volume) => apply(&volume, &agent).await,
            Event::Cleanup(volume) => cleanup(&volume, &agent).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    agent.metrics.record_reconcile("node-agent", result.is_ok());
    agent.changed.notify_one();
    agent.backoff.observe(object.as_ref(), result)
}

fn current(volume: &Volume) -> VolumeStatus {
    volume.status.clone().unwrap_or_default()
}

fn error_policy(volume: Arc<Volume>, error: &Error, agent: Arc<Agent>) -> Action {
    let delay = agent.backoff.failed(volume.as_ref());
    if let Error::Finalizer(inner) = error
        && let finalizer::Error::CleanupFailed(Error::InUse(why)) = inner.as_ref()
    {
        tracing::info!(volume = %volume.name_any(), %why, retry_in = ?delay, "image still in use; deleting it later");
    } else {
        tracing::warn!(volume = %volume.name_any(), %error, retry_in = ?delay, "volume reconcile failed; retrying");
    }
    Action::requeue(delay)
}

/// Runs until the stream ends (the process shuts down).
pub async fn run(agent: Arc<Agent>) {
    let api = volumes::api(&agent.client);
    let selector = format!("{NODE_LABEL}={}", agent.engine.node_id());
    Controller::new(api, watcher::Config::default().labels(&selector))
        .run(reconcile, error_policy, agent)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use plinth_engine::model::{ContentSource, FsType, Provisioning};

    use super::*;
    use crate::crd::VolumeMode;

    fn spec(mode: VolumeMode, fs_type: Option<FsType>, size_bytes: i64) -> VolumeSpec {
        VolumeSpec {
            node: "node-a".into(),
            size_bytes,
            volume_mode: mode,
            fs_type,
            provisioning: Provisioning::Thin,
            mkfs_options: None,
            claim_ref: None,
            content_source: None,
        }
    }

    /// A record as the engine stores it (through its serde form, so fields the engine adds with
    /// defaults need no change here).
    fn record(layout: Layout, capacity_bytes: u64) -> VolumeRecord {
        serde_json::from_value(serde_json::json!({
            "id": VolumeId::for_name("pvc-1").as_str(),
            "name": "pvc-1",
            "capacity_bytes": capacity_bytes,
            "layout": layout,
            "provisioning": Provisioning::Thin,
            "created_at": 0,
        }))
        .expect("a minimal volume record")
    }

    const MIB: i64 = 1 << 20;

    #[test]
    fn a_smaller_image_of_the_same_layout_is_this_volume_grown() {
        let ext4 = Layout::Filesystem { fs_type: FsType::Ext4 };
        assert_eq!(foreign_image(&record(ext4, 32 << 20), &spec(VolumeMode::Filesystem, None, 64 * MIB)), None);
        let grown = spec(VolumeMode::Filesystem, Some(FsType::Ext4), 64 * MIB);
        assert_eq!(foreign_image(&record(ext4, 32 << 20), &grown), None);
        assert_eq!(foreign_image(&record(Layout::Block, 32 << 20), &spec(VolumeMode::Block, None, 64 * MIB)), None);
    }

    #[test]
    fn an_image_of_another_layout_is_not_adopted() {
        let xfs = record(Layout::Filesystem { fs_type: FsType::Xfs }, 512 << 20);
        let wants_ext4 = spec(VolumeMode::Filesystem, Some(FsType::Ext4), 1024 * MIB);
        let why = foreign_image(&xfs, &wants_ext4).expect("xfs is not ext4");
        assert!(why.contains("Xfs") && why.contains("Ext4"), "{why}");
        assert!(foreign_image(&xfs, &spec(VolumeMode::Block, None, 1024 * MIB)).is_some(), "fs is not block");
        let block = record(Layout::Block, 32 << 20);
        assert!(foreign_image(&block, &spec(VolumeMode::Filesystem, None, 64 * MIB)).is_some(), "block is not fs");
        let thick = VolumeRecord { provisioning: Provisioning::Thick, ..record(Layout::Block, 32 << 20) };
        assert!(foreign_image(&thick, &spec(VolumeMode::Block, None, 64 * MIB)).is_some(), "thick is not thin");
        let copy = VolumeRecord {
            content_source: Some(ContentSource::Volume(VolumeId::for_name("other"))),
            ..record(Layout::Block, 32 << 20)
        };
        assert!(foreign_image(&copy, &spec(VolumeMode::Block, None, 64 * MIB)).is_some(), "a copy is not blank");
    }

    #[test]
    fn a_thin_image_of_a_thick_volume_and_a_copy_of_its_own_source_are_adopted() {
        let thick = VolumeSpec { provisioning: Provisioning::Thick, ..spec(VolumeMode::Block, None, 32 * MIB) };
        assert_eq!(
            foreign_image(&record(Layout::Block, 32 << 20), &thick),
            None,
            "turned thick: preallocated in place"
        );
        let snapshot = plinth_engine::ids::SnapshotId::for_name("snapshot-1");
        let restored = VolumeRecord {
            content_source: Some(ContentSource::Snapshot(snapshot.clone())),
            ..record(Layout::Block, 32 << 20)
        };
        let wants = VolumeSpec {
            content_source: Some(VolumeSource::Snapshot(snapshot.to_string())),
            ..spec(VolumeMode::Block, None, 64 * MIB)
        };
        assert_eq!(foreign_image(&restored, &wants), None);
        let other = VolumeSpec { content_source: Some(VolumeSource::Volume("vol-x".into())), ..wants.clone() };
        assert!(foreign_image(&restored, &other).is_some(), "another source");
        let request = create_request("pvc-1", &wants);
        assert_eq!(request.content_source, Some(SourceRequest::Snapshot(snapshot.to_string())));
    }

    #[test]
    fn the_request_matches_the_spec() {
        let request = create_request("pvc-1", &spec(VolumeMode::Filesystem, None, 64 * MIB));
        assert!(matches!(request.capabilities[0].access_type, AccessType::Mount { fs_type: Some(FsType::Ext4), .. }));
        assert_eq!((request.name.as_str(), request.required_bytes, request.limit_bytes), ("pvc-1", 64 * MIB, 0));
        let block = create_request("pvc-1", &spec(VolumeMode::Block, None, 64 * MIB));
        assert!(matches!(block.capabilities[0].access_type, AccessType::Block));
    }
}
