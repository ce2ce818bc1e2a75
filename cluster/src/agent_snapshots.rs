//! The node agent's snapshots: the `Snapshot` and `GroupSnapshot` objects assigned to this node
//! (label `plinth.csi.dev/node`) become snapshots in the local pool, taken with the source frozen
//! when it is mounted here; deleting the object removes them (behind the image finalizer, added
//! and removed by kube-runtime's `finalizer` helper, which tolerates a snapshot never taken).
//!
//! A failure is reported in the object's status (phase Failed, the engine's message) and retried
//! with the agent's per-object backoff: a full pool may have room later.

use std::sync::Arc;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::watcher;
use plinth_engine::Error as EngineError;
use plinth_engine::failpoint;
use plinth_engine::model::SnapshotRecord;
use serde_json::json;

use crate::agent::Agent;
use crate::crd::{GroupSnapshot, GroupSnapshotStatus, MemberSnapshot, Phase, Snapshot, SnapshotStatus};
use crate::keys::{IMAGE_FINALIZER, NODE_LABEL};
use crate::snapshots;
use crate::{Error, Result};

fn nanos(seconds: i64, nanos: i32) -> i64 {
    seconds.saturating_mul(1_000_000_000).saturating_add(i64::from(nanos))
}

fn member(record: &SnapshotRecord) -> MemberSnapshot {
    MemberSnapshot {
        volume_id: record.source_volume_id.to_string(),
        snapshot_id: record.id.to_string(),
        size_bytes: record.size_bytes as i64,
        creation_time: nanos(record.created_at_seconds, record.created_at_nanos),
    }
}

/// Engine failures that say something about the request or the pool (reported as Failed);
/// anything else (a lock held, I/O) is only retried.
fn reportable(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::NotFound(_)
            | EngineError::InvalidArgument(_)
            | EngineError::AlreadyExists(_)
            | EngineError::FailedPrecondition(_)
            | EngineError::ResourceExhausted(_)
            | EngineError::OutOfRange(_)
    )
}

async fn patch_status<K>(api: &kube::Api<K>, name: &str, status: &impl serde::Serialize) -> kube::Result<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&json!({ "status": status }))).await?;
    Ok(())
}

async fn take(snapshot: &Snapshot, agent: &Agent) -> Result<Action> {
    let name = snapshot.name_any();
    let engine = Arc::clone(&agent.engine);
    let (csi_name, source) = (name.clone(), snapshot.spec.source_volume_id.clone());
    let outcome = tokio::task::spawn_blocking(move || engine.create_snapshot(&csi_name, &source)).await?;
    failpoint::check("agent.snapshot_taken")?;
    let generation = snapshot.metadata.generation;
    let status = match &outcome {
        Ok(record) => SnapshotStatus {
            phase: Some(Phase::Ready),
            snapshot_id: Some(record.id.to_string()),
            size_bytes: Some(record.size_bytes as i64),
            creation_time: Some(nanos(record.created_at_seconds, record.created_at_nanos)),
            message: None,
            observed_generation: generation,
        },
        Err(err) if reportable(err) => SnapshotStatus {
            phase: Some(Phase::Failed),
            message: Some(err.chain()),
            observed_generation: generation,
            ..snapshot.status.clone().unwrap_or_default()
        },
        Err(_) => snapshot.status.clone().unwrap_or_default(),
    };
    if snapshot.status.as_ref() != Some(&status) {
        patch_status(&snapshots::api(&agent.client), &name, &status).await?;
    }
    outcome.map(|_| Action::await_change()).map_err(Error::from)
}

async fn release(snapshot: &Snapshot, agent: &Agent) -> Result<Action> {
    let id = snapshots::snapshot_id_for(&snapshot.name_any());
    let engine = Arc::clone(&agent.engine);
    tokio::task::spawn_blocking(move || engine.delete_snapshot(id.as_str())).await??;
    failpoint::check("agent.snapshot_deleted")?;
    tracing::info!(snapshot = %snapshot.name_any(), "snapshot deleted");
    Ok(Action::await_change())
}

async fn take_group(group: &GroupSnapshot, agent: &Agent) -> Result<Action> {
    let name = group.name_any();
    let engine = Arc::clone(&agent.engine);
    let (csi_name, sources) = (name.clone(), group.spec.source_volume_ids.clone());
    let outcome = tokio::task::spawn_blocking(move || engine.create_group_snapshot(&csi_name, &sources)).await?;
    let generation = group.metadata.generation;
    let status = match &outcome {
        Ok((record, members)) => GroupSnapshotStatus {
            phase: Some(Phase::Ready),
            group_snapshot_id: Some(record.id.to_string()),
            creation_time: Some(nanos(record.created_at_seconds, record.created_at_nanos)),
            members: members.iter().map(member).collect(),
            message: None,
            observed_generation: generation,
        },
        Err(err) if reportable(err) => GroupSnapshotStatus {
            phase: Some(Phase::Failed),
            message: Some(err.chain()),
            observed_generation: generation,
            ..group.status.clone().unwrap_or_default()
        },
        Err(_) => group.status.clone().unwrap_or_default(),
    };
    if group.status.as_ref() != Some(&status) {
        patch_status(&snapshots::group_api(&agent.client), &name, &status).await?;
    }
    outcome.map(|_| Action::await_change()).map_err(Error::from)
}

async fn release_group(group: &GroupSnapshot, agent: &Agent) -> Result<Action> {
    let id = snapshots::group_snapshot_id_for(&group.name_any());
    let engine = Arc::clone(&agent.engine);
    tokio::task::spawn_blocking(move || engine.delete_group_snapshot(id.as_str(), &[])).await??;
    tracing::info!(group_snapshot = %group.name_any(), "group snapshot deleted");
    Ok(Action::await_change())
}

async fn reconcile_snapshot(snapshot: Arc<Snapshot>, agent: Arc<Agent>) -> Result<Action> {
    if snapshot.spec.node != agent.engine.node_id() {
        return Ok(Action::await_change());
    }
    let api = snapshots::api(&agent.client);
    let result = finalizer(&api, IMAGE_FINALIZER, Arc::clone(&snapshot), |event| async {
        match event {
            Event::Apply(snapshot) => take(&snapshot, &agent).await,
            Event::Cleanup(snapshot) => release(&snapshot, &agent).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    agent.metrics.record_reconcile("node-agent-snapshots", result.is_ok());
    agent.changed.notify_one();
    agent.backoff.observe(snapshot.as_ref(), result)
}

async fn reconcile_group(group: Arc<GroupSnapshot>, agent: Arc<Agent>) -> Result<Action> {
    if group.spec.node != agent.engine.node_id() {
        return Ok(Action::await_change());
    }
    let api = snapshots::group_api(&agent.client);
    let result = finalizer(&api, IMAGE_FINALIZER, Arc::clone(&group), |event| async {
        match event {
            Event::Apply(group) => take_group(&group, &agent).await,
            Event::Cleanup(group) => release_group(&group, &agent).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    agent.metrics.record_reconcile("node-agent-snapshots", result.is_ok());
    agent.changed.notify_one();
    agent.backoff.observe(group.as_ref(), result)
}

fn error_policy<K: kube::Resource<DynamicType = ()>>(object: Arc<K>, error: &Error, agent: Arc<Agent>) -> Action {
    let delay = agent.backoff.failed(object.as_ref());
    tracing::warn!(object = %kube::runtime::reflector::ObjectRef::from_obj(object.as_ref()), %error, retry_in = ?delay, "snapshot reconcile failed; retrying");
    Action::requeue(delay)
}

/// Runs until the process shuts down.
pub async fn run(agent: Arc<Agent>) {
    let selector = format!("{NODE_LABEL}={}", agent.engine.node_id());
    let single = Controller::new(snapshots::api(&agent.client), watcher::Config::default().labels(&selector))
        .run(reconcile_snapshot, error_policy, Arc::clone(&agent))
        .for_each(|_| async {});
    let groups = Controller::new(snapshots::group_api(&agent.client), watcher::Config::default().labels(&selector))
        .run(reconcile_group, error_policy, agent)
        .for_each(|_| async {});
    futures::join!(single, groups);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_times_are_nanoseconds() {
        assert_eq!(nanos(1_700_000_000, 123_456_789), 1_700_000_000_123_456_789);
        assert!(reportable(&EngineError::ResourceExhausted("pool full".into())));
        assert!(!reportable(&EngineError::Aborted("busy".into())), "a held lock is only retried");
    }
}
