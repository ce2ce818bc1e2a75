//! The node agent: reconciles the `Volume` objects assigned to this node into image files in the
//! local pool (create, grow, delete behind a finalizer) and reports their status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, Event, finalizer};
use kube::runtime::watcher;
use plinth_controller::metrics::Metrics;
use plinth_engine::caps::{AccessMode, AccessType, Capability};
use plinth_engine::model::{Layout, MutableParameters, VolumeParameters, VolumeRecord};
use plinth_engine::volumes::CreateVolume;
use plinth_engine::{Engine, Error as EngineError, VolumeId};

use crate::crd::{Phase, Volume, VolumeSpec, VolumeStatus};
use crate::keys::{IMAGE_FINALIZER, NODE_LABEL};
use crate::volumes;
use crate::{Error, Result};

pub struct Agent {
    pub client: kube::Client,
    pub engine: Arc<Engine>,
    /// Woken after every change so capacity is republished promptly.
    pub changed: Arc<tokio::sync::Notify>,
    pub metrics: Arc<Metrics>,
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
        content_source: None,
        mutable_parameters: MutableParameters::default(),
    }
}

/// The engine refuses a create whose name has a record that differs from the request
/// (ALREADY_EXISTS). For a Volume that is expected in one case only: the record is this Volume's
/// image, made earlier at a smaller size, and the Volume has since grown. Anything else — another
/// layout, provisioning or a copy — is not this Volume's image, and says why.
pub fn foreign_image(existing: &VolumeRecord, spec: &VolumeSpec) -> Option<String> {
    if existing.layout != spec.layout() {
        Some(format!("it was made as {:?}, the Volume asks for {:?}", existing.layout, spec.layout()))
    } else if existing.provisioning != spec.provisioning {
        Some(format!(
            "it is {} provisioned, the Volume asks for {}",
            existing.provisioning.as_str(),
            spec.provisioning.as_str()
        ))
    } else {
        existing.content_source.as_ref().map(|source| format!("it was copied from {source:?}"))
    }
}

/// Makes (or finds) the image, grows it to the Volume's size; returns the volume ID, capacity
/// and allocated bytes.
fn make_image(engine: &Engine, name: &str, spec: &VolumeSpec) -> plinth_engine::Result<(VolumeId, u64, u64)> {
    let request = create_request(name, spec);
    let record = match engine.create_volume(&request) {
        Ok(record) => record,
        Err(EngineError::AlreadyExists(why)) => {
            let existing =
                engine.volume_by_name(name)?.ok_or_else(|| EngineError::internal("volume vanished", why.clone()))?;
            if let Some(reason) = foreign_image(&existing, spec) {
                return Err(EngineError::AlreadyExists(format!(
                    "this node already has a volume named {name} ({}) that is not this Volume's image: {reason}",
                    existing.id
                )));
            }
            existing
        }
        Err(other) => return Err(other),
    };
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
    let generation = volume.metadata.generation;
    match outcome {
        Ok((volume_id, capacity, allocated)) => {
            let status = VolumeStatus {
                phase: Some(Phase::Ready),
                volume_id: Some(volume_id.to_string()),
                capacity_bytes: Some(capacity as i64),
                allocated_bytes: Some(allocated as i64),
                message: None,
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
                observed_generation: generation,
                ..current(volume)
            };
            if volume.status.as_ref() != Some(&status) {
                volumes::set_status(&agent.client, &name, &status).await?;
            }
            Ok(Action::requeue(Duration::from_secs(30)))
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
            tracing::info!(volume = %name, "image deleted");
            Ok(Action::await_change())
        }
        Err(EngineError::FailedPrecondition(why)) => {
            let status = VolumeStatus { phase: Some(Phase::Deleting), message: Some(why.clone()), ..current(volume) };
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
    result
}

fn current(volume: &Volume) -> VolumeStatus {
    volume.status.clone().unwrap_or_default()
}

fn error_policy(volume: Arc<Volume>, error: &Error, _: Arc<Agent>) -> Action {
    if let Error::Finalizer(inner) = error
        && let finalizer::Error::CleanupFailed(Error::InUse(why)) = inner.as_ref()
    {
        tracing::info!(volume = %volume.name_any(), %why, "image still in use; deleting it later");
        return Action::requeue(Duration::from_secs(10));
    }
    tracing::warn!(volume = %volume.name_any(), %error, "volume reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
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
        }
    }

    fn record(layout: Layout, capacity_bytes: u64) -> VolumeRecord {
        VolumeRecord {
            id: VolumeId::for_name("pvc-1"),
            name: "pvc-1".into(),
            capacity_bytes,
            layout,
            provisioning: Provisioning::Thin,
            created_at: 0,
            staged: None,
            published: Default::default(),
            content_source: None,
            filesystem_bytes: 0,
            mkfs_options: Vec::new(),
        }
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
    fn the_request_matches_the_spec() {
        let request = create_request("pvc-1", &spec(VolumeMode::Filesystem, None, 64 * MIB));
        assert!(matches!(request.capabilities[0].access_type, AccessType::Mount { fs_type: Some(FsType::Ext4), .. }));
        assert_eq!((request.name.as_str(), request.required_bytes, request.limit_bytes), ("pvc-1", 64 * MIB, 0));
        let block = create_request("pvc-1", &spec(VolumeMode::Block, None, 64 * MIB));
        assert!(matches!(block.capabilities[0].access_type, AccessType::Block));
    }
}
