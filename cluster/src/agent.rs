//! The node agent: reconciles the `Volume` objects assigned to this node into image files in the
//! local pool (create, grow, delete behind a finalizer) and reports their status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use plinth_controller::metrics::METRICS;
use plinth_engine::caps::{AccessMode, AccessType, Capability};
use plinth_engine::model::{FsType, MutableParameters, Provisioning, VolumeParameters};
use plinth_engine::volumes::CreateVolume;
use plinth_engine::{Engine, Error as EngineError};
use serde_json::json;

use crate::crd::{Phase, Volume, VolumeMode, VolumeStatus};
use crate::keys::{IMAGE_FINALIZER, NODE_LABEL};
use crate::{Error, Result};

pub struct Agent {
    pub client: kube::Client,
    pub engine: Arc<Engine>,
    /// Woken after every change so capacity is republished promptly.
    pub changed: Arc<tokio::sync::Notify>,
}

fn create_request(volume: &Volume) -> Result<CreateVolume> {
    let spec = &volume.spec;
    let access_type = match spec.volume_mode {
        VolumeMode::Block => AccessType::Block,
        VolumeMode::Filesystem => AccessType::Mount {
            fs_type: Some(FsType::parse(spec.fs_type.as_deref().unwrap_or("ext4"))?),
            mount_flags: Vec::new(),
            volume_mount_group: String::new(),
        },
    };
    let provisioning = match spec.provisioning.as_deref() {
        Some(p) => Provisioning::parse(p)?,
        None => Provisioning::Thin,
    };
    Ok(CreateVolume {
        name: volume.name_any(),
        required_bytes: spec.size_bytes,
        limit_bytes: 0,
        capabilities: vec![Capability { access_type, mode: AccessMode::SingleNodeWriter }],
        parameters: VolumeParameters { fs_type: None, provisioning, mkfs_options: spec.mkfs_options.clone() },
        requisite_nodes: None,
        content_source: None,
        mutable_parameters: MutableParameters::default(),
    })
}

async fn set_status(api: &Api<Volume>, name: &str, status: VolumeStatus) -> Result<()> {
    let patch = json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

async fn remove_finalizer(api: &Api<Volume>, volume: &Volume) -> Result<()> {
    let remaining: Vec<String> = volume.finalizers().iter().filter(|f| *f != IMAGE_FINALIZER).cloned().collect();
    let patch = json!({ "metadata": { "finalizers": remaining, "resourceVersion": volume.resource_version() } });
    api.patch(&volume.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

async fn reconcile(volume: Arc<Volume>, agent: Arc<Agent>) -> Result<Action> {
    let result = reconcile_inner(&volume, &agent).await;
    METRICS.record_reconcile("node-agent", result.is_ok());
    agent.changed.notify_one();
    result
}

async fn reconcile_inner(volume: &Volume, agent: &Agent) -> Result<Action> {
    let api: Api<Volume> = Api::all(agent.client.clone());
    let name = volume.name_any();
    if volume.spec.node != agent.engine.node_id() {
        return Ok(Action::await_change());
    }
    if volume.meta().deletion_timestamp.is_some() {
        if !volume.finalizers().iter().any(|f| f == IMAGE_FINALIZER) {
            return Ok(Action::await_change());
        }
        let engine = Arc::clone(&agent.engine);
        let id = plinth_engine::VolumeId::for_name(&name);
        match tokio::task::spawn_blocking(move || engine.delete_volume(id.as_str())).await? {
            Ok(()) => {
                remove_finalizer(&api, volume).await?;
                tracing::info!(volume = %name, "image deleted; finalizer removed");
                Ok(Action::await_change())
            }
            Err(EngineError::FailedPrecondition(why)) => {
                // Still staged or published on this node: storage never vanishes under a pod.
                let status = VolumeStatus { phase: Some(Phase::Deleting), message: Some(why), ..current(volume) };
                set_status(&api, &name, status).await?;
                Ok(Action::requeue(Duration::from_secs(10)))
            }
            Err(err) => Err(err.into()),
        }
    } else {
        if !volume.finalizers().iter().any(|f| f == IMAGE_FINALIZER) {
            let mut finalizers = volume.finalizers().to_vec();
            finalizers.push(IMAGE_FINALIZER.to_owned());
            let patch = json!({ "metadata": { "finalizers": finalizers } });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }
        let request = create_request(volume)?;
        let engine = Arc::clone(&agent.engine);
        let wanted = volume.spec.size_bytes;
        let outcome = tokio::task::spawn_blocking(move || -> plinth_engine::Result<(String, u64, u64)> {
            let record = engine.create_volume(&request).or_else(|err| match err {
                // An existing image of another size is this volume after an expansion.
                EngineError::AlreadyExists(_) => engine
                    .volume_by_name(&request.name)?
                    .ok_or_else(|| EngineError::internal("volume vanished", "record missing")),
                other => Err(other),
            })?;
            let mut capacity = record.capacity_bytes;
            if (capacity as i64) < wanted {
                capacity = engine.expand_volume(record.id.as_str(), wanted, 0)?.0;
            }
            Ok((record.id.to_string(), capacity, engine.allocated_bytes(&record.id)))
        })
        .await?;
        let generation = volume.meta().generation;
        match outcome {
            Ok((volume_id, capacity, allocated)) => {
                let status = VolumeStatus {
                    phase: Some(Phase::Ready),
                    volume_id: Some(volume_id),
                    capacity_bytes: Some(capacity as i64),
                    allocated_bytes: Some(allocated as i64),
                    message: None,
                    observed_generation: generation,
                };
                if volume.status.as_ref() != Some(&status) {
                    set_status(&api, &name, status).await?;
                }
                Ok(Action::requeue(Duration::from_secs(300)))
            }
            Err(
                err
                @ (EngineError::ResourceExhausted(_) | EngineError::OutOfRange(_) | EngineError::InvalidArgument(_)),
            ) => {
                let status = VolumeStatus {
                    phase: Some(Phase::Failed),
                    message: Some(err.chain()),
                    observed_generation: generation,
                    ..current(volume)
                };
                set_status(&api, &name, status).await?;
                Ok(Action::requeue(Duration::from_secs(30)))
            }
            Err(err) => Err(err.into()),
        }
    }
}

fn current(volume: &Volume) -> VolumeStatus {
    volume.status.clone().unwrap_or_default()
}

fn error_policy(volume: Arc<Volume>, error: &Error, _: Arc<Agent>) -> Action {
    tracing::warn!(volume = %volume.name_any(), %error, "volume reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs until the stream ends (the process shuts down).
pub async fn run(agent: Arc<Agent>) {
    let api: Api<Volume> = Api::all(agent.client.clone());
    let selector = format!("{NODE_LABEL}={}", agent.engine.node_id());
    Controller::new(api, watcher::Config::default().labels(&selector))
        .run(reconcile, error_policy, agent)
        .for_each(|_| async {})
        .await;
}
