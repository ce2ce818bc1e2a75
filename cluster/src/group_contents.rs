//! plinth's side of the group snapshot protocol (groupsnapshot.storage.k8s.io/v1, as the v8.7
//! snapshot-controller serves it) for VolumeGroupSnapshotContents of driver plinth.csi.dev: the
//! volumes' node takes one crash-consistent `GroupSnapshot` (every mounted member frozen, all
//! copied, all thawed); its report fills the content's status with every member
//! (`volumeSnapshotInfoList`), from which the common controller makes the members'
//! VolumeSnapshots and contents. Members on different nodes cannot be snapshotted together and
//! say so. Deletion follows `snapshot_contents`.

use std::sync::Arc;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use plinth_engine::model::check_snapshot_parameters;
use plinth_proto::DRIVER_NAME;
use serde_json::json;

use crate::crd::{GroupSnapshot, Phase};
use crate::keys::REQUESTED_BY_LABEL;
use crate::provisioner::{Context, error_policy};
use crate::snapshot_api::{
    DeletionPolicy, GROUP_BEING_CREATED, GROUP_BEING_DELETED, GROUP_CONTENT_FINALIZER, GROUP_SNAPSHOT_GROUP,
    VolumeGroupSnapshotContent, class_parameters, rfc3339_from_nanos,
};
use crate::snapshot_contents::{annotate, gone_is_done, patch_status, release, report_failure, unannotate};
use crate::snapshots::{self, settled};
use crate::{Error, Result};

/// The CSI name of the group snapshot for the VolumeGroupSnapshot with this UID (the sidecar's
/// default `groupsnapshot-<uid>`).
pub fn group_name(volume_group_snapshot_uid: &str) -> String {
    format!("groupsnapshot-{volume_group_snapshot_uid}")
}

fn api(client: &kube::Client) -> Api<VolumeGroupSnapshotContent> {
    Api::all(client.clone())
}

async fn fail(ctx: &Context, content: &VolumeGroupSnapshotContent, reason: &str, message: String) -> Result<Action> {
    let reported = content.status.as_ref().and_then(|s| s.error.as_ref()).and_then(|e| e.message.as_deref());
    report_failure(ctx, content, reported, reason, message).await
}

async fn reconcile(content: Arc<VolumeGroupSnapshotContent>, ctx: Arc<Context>) -> Result<Action> {
    if content.spec.driver != DRIVER_NAME {
        return Ok(Action::await_change());
    }
    let result = if content.meta().deletion_timestamp.is_some() {
        delete(&content, &ctx).await
    } else {
        sync(&content, &ctx).await
    };
    let result = gone_is_done(result);
    ctx.metrics.record_reconcile("group-snapshot-contents", result.is_ok());
    ctx.backoff.observe(content.as_ref(), result)
}

async fn sync(content: &VolumeGroupSnapshotContent, ctx: &Context) -> Result<Action> {
    if content.status.as_ref().and_then(|s| s.ready_to_use) == Some(true) {
        unannotate(&api(&ctx.client), content, GROUP_BEING_CREATED).await?;
        return Ok(Action::await_change());
    }
    if let Some(handles) = &content.spec.source.group_snapshot_handles {
        return adopt(content, &handles.volume_group_snapshot_handle, ctx).await;
    }
    if content.spec.source.volume_handles.is_empty() {
        return Ok(Action::await_change());
    }
    let Some(uid) = content.spec.volume_group_snapshot_ref.uid.as_deref().filter(|u| !u.is_empty()) else {
        return Ok(Action::await_change());
    };
    if let Some(class) = content.spec.volume_group_snapshot_class_name.as_deref() {
        let parameters = class_parameters(
            &ctx.client,
            GROUP_SNAPSHOT_GROUP,
            "VolumeGroupSnapshotClass",
            "volumegroupsnapshotclasses",
            class,
        )
        .await?;
        let problem = match parameters {
            None => Some(format!("VolumeGroupSnapshotClass {class} does not exist")),
            Some(p) => check_snapshot_parameters(&p).err().map(|e| format!("VolumeGroupSnapshotClass {class}: {e}")),
        };
        if let Some(problem) = problem {
            return fail(
                ctx,
                content,
                "GroupSnapshotCreationFailed",
                format!("Failed to create group snapshot: {problem}"),
            )
            .await;
        }
    }
    let contents = api(&ctx.client);
    let name = group_name(uid);
    let handles = &content.spec.source.volume_handles;
    let group = match snapshots::request_group(&ctx.client, &name, handles, Some(&content.name_any())).await {
        Ok(group) => group,
        Err(error) => {
            // Final: nothing is being cut. (Set only once something is, so a refused request
            // does not toggle it — each toggle would be a new event and defeat the backoff.)
            unannotate(&contents, content, GROUP_BEING_CREATED).await?;
            let message = format!("Failed to create group snapshot: {}", plinth_controller::rpc::chain(&error));
            return fail(ctx, content, "GroupSnapshotCreationFailed", message).await;
        }
    };
    if let Some(why) = settled(&group, Phase::Failed) {
        let message = format!("Failed to create group snapshot: node {} could not take it: {why}", group.spec.node);
        return fail(ctx, content, "GroupSnapshotCreationFailed", message).await;
    }
    if settled(&group, Phase::Ready).is_none() {
        // The node is cutting it (or will, once its agent is up).
        annotate(&contents, content, GROUP_BEING_CREATED).await?;
        return Ok(Action::await_change());
    }
    fill(ctx, content, &group).await?;
    unannotate(&contents, content, GROUP_BEING_CREATED).await?;
    Ok(Action::await_change())
}

async fn fill(ctx: &Context, content: &VolumeGroupSnapshotContent, group: &GroupSnapshot) -> Result<()> {
    let status = group.status.clone().unwrap_or_default();
    let members: Vec<serde_json::Value> = status
        .members
        .iter()
        .map(|m| {
            json!({
                "volumeHandle": m.volume_id,
                "snapshotHandle": m.snapshot_id,
                "creationTime": m.creation_time,
                "readyToUse": true,
                "restoreSize": m.size_bytes,
            })
        })
        .collect();
    let filled = json!({
        "volumeGroupSnapshotHandle": status.group_snapshot_id,
        "readyToUse": true,
        "creationTime": status.creation_time.map(rfc3339_from_nanos),
        "volumeSnapshotInfoList": members,
        "error": null,
    });
    patch_status(&api(&ctx.client), content, filled).await
}

async fn adopt(content: &VolumeGroupSnapshotContent, handle: &str, ctx: &Context) -> Result<Action> {
    let Some(group) = snapshots::group_by_id(&ctx.client, handle).await? else {
        let message = format!("no plinth node holds group snapshot {handle}");
        return fail(ctx, content, "GroupSnapshotContentCheckandUpdateFailed", message).await;
    };
    if settled(&group, Phase::Ready).is_none() {
        return Err(Error::Waiting(format!("group snapshot {handle} to be ready on node {}", group.spec.node)));
    }
    let status = group.status.clone().unwrap_or_default();
    let filled = json!({
        "volumeGroupSnapshotHandle": handle,
        "readyToUse": true,
        "creationTime": status.creation_time.map(rfc3339_from_nanos),
        "error": null,
    });
    patch_status(&api(&ctx.client), content, filled).await?;
    Ok(Action::await_change())
}

async fn delete(content: &VolumeGroupSnapshotContent, ctx: &Context) -> Result<Action> {
    let unbound_pre_provisioned = content.spec.source.group_snapshot_handles.is_some()
        && content.spec.volume_group_snapshot_ref.uid.as_deref().is_none_or(str::is_empty);
    if !content.annotations().contains_key(GROUP_BEING_DELETED) && !unbound_pre_provisioned {
        return Ok(Action::await_change());
    }
    let status = content.status.clone().unwrap_or_default();
    if content.spec.deletion_policy == DeletionPolicy::Delete {
        let mut ids: Vec<String> = status.volume_group_snapshot_handle.iter().cloned().collect();
        ids.extend(content.spec.source.group_snapshot_handles.iter().map(|h| h.volume_group_snapshot_handle.clone()));
        let selector = format!("{REQUESTED_BY_LABEL}={}", content.name_any());
        let asked = snapshots::group_api(&ctx.client).list(&kube::api::ListParams::default().labels(&selector)).await?;
        ids.extend(asked.items.iter().map(|g| snapshots::group_snapshot_id_for(&g.name_any()).to_string()));
        ids.sort();
        ids.dedup();
        let mut pending = Vec::new();
        for id in &ids {
            if let Some(group) = snapshots::remove_group(&ctx.client, id).await? {
                pending.push(format!("{id} on node {}", group.spec.node));
            }
        }
        if !pending.is_empty() {
            return Err(Error::Waiting(format!("group snapshot {} to be deleted", pending.join(", "))));
        }
        if status.volume_group_snapshot_handle.is_some() {
            let cleared =
                json!({ "volumeGroupSnapshotHandle": null, "readyToUse": null, "creationTime": null, "error": null });
            patch_status(&api(&ctx.client), content, cleared).await?;
        }
    }
    release(&api(&ctx.client), content, GROUP_CONTENT_FINALIZER).await?;
    Ok(Action::await_change())
}

/// Runs until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    Controller::new(api(&client), watcher::Config::default())
        .watches(snapshots::group_api(&client), watcher::Config::default(), |group: GroupSnapshot| {
            group.labels().get(REQUESTED_BY_LABEL).map(|content| ObjectRef::<VolumeGroupSnapshotContent>::new(content))
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
