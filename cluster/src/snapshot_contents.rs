//! plinth's side of the snapshot protocol (see `snapshot_api`) for VolumeSnapshotContents of
//! driver plinth.csi.dev: the job the csi-snapshotter sidecar does for other drivers, done here
//! without it. A dynamic content becomes a `Snapshot` object, which the agent of the node holding
//! the source volume takes; its report fills the content's status and the common
//! snapshot-controller binds VolumeSnapshot ↔ content. A pre-provisioned content is checked
//! against the snapshots plinth's nodes hold. Deleting a content with deletionPolicy Delete
//! deletes its snapshot where it lives; Retain keeps it. Failures become `status.error` and
//! Events, retried with the per-object backoff.
//!
//! It runs only where the snapshot CRDs exist (`snapshot_api::served`); the sidecar path
//! (`csi_snapshots`) shares `snapshots::request`, so both make the same snapshot for the same
//! VolumeSnapshot.

use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use plinth_engine::failpoint;
use plinth_engine::model::check_snapshot_parameters;
use plinth_proto::DRIVER_NAME;
use serde_json::json;

use crate::crd::{Phase, Snapshot};
use crate::keys::REQUESTED_BY_LABEL;
use crate::provisioner::{Context, error_policy};
use crate::snapshot_api::{
    BEING_CREATED, BEING_DELETED, CONTENT_FINALIZER, DeletionPolicy, GROUP_HANDLE_ANNOTATION, SNAPSHOT_GROUP,
    VolumeSnapshotContent, class_parameters,
};
use crate::snapshots::{self, settled};
use crate::{Error, Result};

/// The CSI name of the snapshot for the VolumeSnapshot with this UID: what the csi-snapshotter
/// sidecar names it (`--snapshot-name-prefix` default, no truncation), so both paths agree.
pub fn snapshot_name(volume_snapshot_uid: &str) -> String {
    format!("snapshot-{volume_snapshot_uid}")
}

fn api(client: &kube::Client) -> Api<VolumeSnapshotContent> {
    Api::all(client.clone())
}

/// Sets `key: yes` on the object's annotations unless it is there.
pub(crate) async fn annotate<K>(api: &Api<K>, object: &K, key: &str) -> Result<()>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    if object.annotations().contains_key(key) {
        return Ok(());
    }
    let patch = json!({ "metadata": { "annotations": { key: "yes" } } });
    api.patch(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

pub(crate) async fn unannotate<K>(api: &Api<K>, object: &K, key: &str) -> Result<()>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    if !object.annotations().contains_key(key) {
        return Ok(());
    }
    let patch = json!({ "metadata": { "annotations": { key: null } } });
    api.patch(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Removes `finalizer`, checked against the list this reconcile saw (never blindly).
pub(crate) async fn release<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<()>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let current = object.finalizers();
    if !current.iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let kept: Vec<&String> = current.iter().filter(|f| *f != finalizer).collect();
    let patch = json!([
        { "op": "test", "path": "/metadata/finalizers", "value": current },
        { "op": "replace", "path": "/metadata/finalizers", "value": kept },
    ]);
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|e| Error::Invalid(e.to_string()))?;
    api.patch(&object.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
    Ok(())
}

pub(crate) async fn patch_status<K>(api: &Api<K>, object: &K, status: serde_json::Value) -> Result<()>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    api.patch_status(&object.name_any(), &PatchParams::default(), &Patch::Merge(&json!({ "status": status }))).await?;
    Ok(())
}

/// A content that vanished mid-reconcile (its finalizer was just released) needs nothing more.
pub(crate) fn gone_is_done(result: Result<Action>) -> Result<Action> {
    match result {
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(Action::await_change()),
        other => other,
    }
}

pub(crate) fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Reports a failure of a (group) snapshot content whose status already says `reported`:
/// `status.error` (readyToUse false) once per message, an Event each time, and an error for the
/// backoff.
pub(crate) async fn report_failure<K>(
    ctx: &Context,
    content: &K,
    reported: Option<&str>,
    reason: &str,
    message: String,
) -> Result<Action>
where
    K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    if reported != Some(message.as_str()) {
        let status = json!({ "error": { "message": message, "time": now() }, "readyToUse": false });
        patch_status(&Api::<K>::all(ctx.client.clone()), content, status).await?;
    }
    ctx.event(content, EventType::Warning, reason, message.clone());
    Err(Error::Invalid(message))
}

async fn fail(ctx: &Context, content: &VolumeSnapshotContent, reason: &str, message: String) -> Result<Action> {
    let reported = content.status.as_ref().and_then(|s| s.error.as_ref()).and_then(|e| e.message.as_deref());
    report_failure(ctx, content, reported, reason, message).await
}

async fn reconcile(content: Arc<VolumeSnapshotContent>, ctx: Arc<Context>) -> Result<Action> {
    if content.spec.driver != DRIVER_NAME {
        return Ok(Action::await_change());
    }
    let result = if content.meta().deletion_timestamp.is_some() {
        delete(&content, &ctx).await
    } else {
        sync(&content, &ctx).await
    };
    let result = gone_is_done(result);
    ctx.metrics.record_reconcile("snapshot-contents", result.is_ok());
    ctx.backoff.observe(content.as_ref(), result)
}

async fn sync(content: &VolumeSnapshotContent, ctx: &Context) -> Result<Action> {
    if content.annotations().contains_key(GROUP_HANDLE_ANNOTATION) {
        // A group's member: the common controller copies its status from the group's content.
        return Ok(Action::await_change());
    }
    if content.status.as_ref().and_then(|s| s.ready_to_use) == Some(true) {
        unannotate(&api(&ctx.client), content, BEING_CREATED).await?;
        return Ok(Action::await_change());
    }
    match (&content.spec.source.volume_handle, &content.spec.source.snapshot_handle) {
        (Some(volume_id), None) => take(content, volume_id, ctx).await,
        (None, Some(snapshot_id)) => adopt(content, snapshot_id, ctx).await,
        // The common controller flags a content naming neither or both.
        _ => Ok(Action::await_change()),
    }
}

/// Checks the class's parameters: plinth takes none of its own (`csi.storage.k8s.io/` keys are
/// the sidecars' and informational).
async fn check_class(ctx: &Context, content: &VolumeSnapshotContent) -> Result<Option<String>> {
    let Some(class) = content.spec.volume_snapshot_class_name.as_deref() else {
        return Ok(Some(format!("content {} names no VolumeSnapshotClass", content.name_any())));
    };
    let parameters =
        class_parameters(&ctx.client, SNAPSHOT_GROUP, "VolumeSnapshotClass", "volumesnapshotclasses", class).await?;
    Ok(match parameters {
        None => Some(format!("VolumeSnapshotClass {class} does not exist")),
        Some(parameters) => {
            check_snapshot_parameters(&parameters).err().map(|e| format!("VolumeSnapshotClass {class}: {e}"))
        }
    })
}

/// A dynamic content: the node holding `volume_id` takes the snapshot.
async fn take(content: &VolumeSnapshotContent, volume_id: &str, ctx: &Context) -> Result<Action> {
    let Some(uid) = content.spec.volume_snapshot_ref.uid.as_deref().filter(|u| !u.is_empty()) else {
        // Not bound to its VolumeSnapshot yet; the common controller does that first.
        return Ok(Action::await_change());
    };
    if let Some(problem) = check_class(ctx, content).await? {
        return fail(ctx, content, "SnapshotCreationFailed", format!("Failed to create snapshot: {problem}")).await;
    }
    let contents = api(&ctx.client);
    let name = snapshot_name(uid);
    let snapshot = match snapshots::request(&ctx.client, &name, volume_id, Some(&content.name_any())).await {
        Ok(snapshot) => snapshot,
        Err(error) => {
            // Final: nothing is being cut, so the content may be deleted freely. (Set only once
            // something is, so a refused request does not toggle it: each toggle would be an
            // update event and defeat the backoff.)
            unannotate(&contents, content, BEING_CREATED).await?;
            let message = format!("Failed to create snapshot: {}", plinth_controller::rpc::chain(&error));
            return fail(ctx, content, "SnapshotCreationFailed", message).await;
        }
    };
    failpoint::check("snapshot.requested")?;
    if let Some(why) = settled(&snapshot, Phase::Failed) {
        let message =
            format!("Failed to create snapshot: node {} could not snapshot {volume_id}: {why}", snapshot.spec.node);
        return fail(ctx, content, "SnapshotCreationFailed", message).await;
    }
    if settled(&snapshot, Phase::Ready).is_none() {
        // The node is cutting it. Its agent reports on the Snapshot, which is watched: that
        // brings us back. A node whose agent is down leaves the content waiting until it is up.
        annotate(&contents, content, BEING_CREATED).await?;
        return Ok(Action::await_change());
    }
    fill(ctx, content, &snapshot).await?;
    failpoint::check("snapshot.content_filled")?;
    unannotate(&contents, content, BEING_CREATED).await?;
    Ok(Action::await_change())
}

async fn fill(ctx: &Context, content: &VolumeSnapshotContent, snapshot: &Snapshot) -> Result<()> {
    let status = snapshot.status.clone().unwrap_or_default();
    let filled = json!({
        "snapshotHandle": status.snapshot_id,
        "readyToUse": true,
        "creationTime": status.creation_time,
        "restoreSize": status.size_bytes,
        "error": null,
    });
    patch_status(&api(&ctx.client), content, filled).await
}

/// A pre-provisioned content: valid when a plinth node holds the snapshot it names.
async fn adopt(content: &VolumeSnapshotContent, snapshot_id: &str, ctx: &Context) -> Result<Action> {
    let Some(found) = snapshots::locate(&ctx.client, snapshot_id).await? else {
        let message = format!("no plinth node holds snapshot {snapshot_id}");
        return fail(ctx, content, "SnapshotContentCheckandUpdateFailed", message).await;
    };
    if !found.ready {
        return Err(Error::Waiting(format!("snapshot {snapshot_id} to be ready on node {}", found.node)));
    }
    let mut filled = json!({
        "snapshotHandle": found.snapshot_id,
        "readyToUse": true,
        "creationTime": found.creation_time,
        "restoreSize": found.size_bytes,
        "error": null,
    });
    if let Some(group) = found.group_snapshot_id {
        filled["volumeGroupSnapshotHandle"] = json!(group);
    }
    patch_status(&api(&ctx.client), content, filled).await?;
    Ok(Action::await_change())
}

/// Deletes what the content stands for, when the protocol says so, then lets it go.
async fn delete(content: &VolumeSnapshotContent, ctx: &Context) -> Result<Action> {
    let unbound_pre_provisioned = content.spec.source.snapshot_handle.is_some()
        && content.spec.volume_snapshot_ref.uid.as_deref().is_none_or(str::is_empty);
    if !content.annotations().contains_key(BEING_DELETED) && !unbound_pre_provisioned {
        // Its VolumeSnapshot is not being deleted: someone deleted the content itself. The
        // common controller decides; the finalizer stays.
        return Ok(Action::await_change());
    }
    let status = content.status.clone().unwrap_or_default();
    let member =
        status.volume_group_snapshot_handle.is_some() || content.annotations().contains_key(GROUP_HANDLE_ANNOTATION);
    if content.spec.deletion_policy == DeletionPolicy::Delete && !member {
        let mut ids: Vec<String> =
            status.snapshot_handle.iter().chain(&content.spec.source.snapshot_handle).cloned().collect();
        // A snapshot this content asked for but whose handle never reached the status (its node
        // was down, say) goes too: nothing is left behind.
        let selector = format!("{REQUESTED_BY_LABEL}={}", content.name_any());
        let asked = snapshots::api(&ctx.client).list(&kube::api::ListParams::default().labels(&selector)).await?;
        ids.extend(asked.items.iter().map(|s| snapshots::snapshot_id_for(&s.name_any()).to_string()));
        ids.sort();
        ids.dedup();
        let mut pending = Vec::new();
        for id in &ids {
            if let Some(snapshot) = snapshots::remove(&ctx.client, id).await? {
                pending.push(format!("{id} on node {}", snapshot.spec.node));
            }
        }
        failpoint::check("snapshot_delete.requested")?;
        if !pending.is_empty() {
            return Err(Error::Waiting(format!("snapshot {} to be deleted", pending.join(", "))));
        }
        if status.snapshot_handle.is_some() {
            let cleared =
                json!({ "snapshotHandle": null, "readyToUse": null, "creationTime": null, "restoreSize": null });
            patch_status(&api(&ctx.client), content, cleared).await?;
        }
    }
    release(&api(&ctx.client), content, CONTENT_FINALIZER).await?;
    Ok(Action::await_change())
}

/// Runs until shutdown. Snapshots are mapped back to the content that asked for them.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    Controller::new(api(&client), watcher::Config::default())
        .watches(snapshots::api(&client), watcher::Config::default(), |snapshot: Snapshot| {
            snapshot.labels().get(REQUESTED_BY_LABEL).map(|content| ObjectRef::<VolumeSnapshotContent>::new(content))
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_paths_name_a_snapshot_alike() {
        // csi-snapshotter: fmt.Sprintf("%s-%s", prefix, uid) with the default prefix "snapshot".
        assert_eq!(snapshot_name("3f2a-11"), "snapshot-3f2a-11");
        assert_eq!(
            snapshots::snapshot_id_for(&snapshot_name("3f2a-11")),
            plinth_engine::ids::SnapshotId::for_name("snapshot-3f2a-11")
        );
    }
}
