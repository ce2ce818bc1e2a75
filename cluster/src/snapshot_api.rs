//! The Kubernetes snapshot API as the external-snapshotter's CRDs define it
//! (snapshot.storage.k8s.io/v1, groupsnapshot.storage.k8s.io/v1): only the fields plinth reads or
//! writes, and the names of the annotations and finalizers of the protocol between the common
//! snapshot-controller and a CSI driver's side (the csi-snapshotter sidecar, or plinth's own
//! content reconcilers). The cluster installs the CRDs; plinth never creates them.
//!
//! The protocol, as the v8 snapshot-controller expects it of the driver side:
//! - the common controller creates a VolumeSnapshotContent per dynamic VolumeSnapshot
//!   (`snapcontent-<snapshot uid>`, `spec.source.volumeHandle`, the class's deletionPolicy) and
//!   adds [`CONTENT_FINALIZER`];
//! - the driver side sets [`BEING_CREATED`] while a snapshot is being cut, fills `status`
//!   (snapshotHandle, creationTime in ns, readyToUse, restoreSize in bytes), then removes the
//!   annotation; a failure goes to `status.error` and an Event, and is retried;
//! - a pre-provisioned content (`spec.source.snapshotHandle`) gets the same status once the
//!   driver has checked the snapshot exists;
//! - deleting the VolumeSnapshot makes the common controller set [`BEING_DELETED`] and, for
//!   deletionPolicy Delete, delete the content; the driver side then deletes the snapshot (unless
//!   it belongs to a group), clears the status fields and removes [`CONTENT_FINALIZER`];
//! - members of a group snapshot carry [`GROUP_HANDLE_ANNOTATION`]: the common controller fills
//!   their status from the group's content; the driver side only releases their finalizer;
//! - VolumeGroupSnapshotContents follow the same steps with the `groupsnapshot.storage.kubernetes.io`
//!   annotations and finalizer; their status lists every member (`volumeSnapshotInfoList`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

pub const SNAPSHOT_GROUP: &str = "snapshot.storage.k8s.io";
pub const GROUP_SNAPSHOT_GROUP: &str = "groupsnapshot.storage.k8s.io";

/// On a VolumeSnapshotContent while the driver side cuts its snapshot.
pub const BEING_CREATED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-created";
/// On a VolumeSnapshotContent whose VolumeSnapshot is being deleted.
pub const BEING_DELETED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";
/// The common controller's finalizer on a bound VolumeSnapshotContent; the driver side removes it.
pub const CONTENT_FINALIZER: &str = "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";
/// On a VolumeSnapshotContent that is a member of a group snapshot: the group's handle.
pub const GROUP_HANDLE_ANNOTATION: &str = "groupsnapshot.storage.k8s.io/volumeGroupSnapshotHandle";
pub const GROUP_BEING_CREATED: &str = "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-being-created";
pub const GROUP_BEING_DELETED: &str = "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-being-deleted";
pub const GROUP_CONTENT_FINALIZER: &str =
    "groupsnapshot.storage.kubernetes.io/volumegroupsnapshotcontent-bound-protection";

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotContent",
    status = "VolumeSnapshotContentStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSpec {
    pub driver: String,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    pub source: ContentSource,
    #[serde(default)]
    pub volume_snapshot_ref: ObjectReference,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

/// Exactly one is set: a volume to snapshot (dynamic) or an existing snapshot (pre-provisioned).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ContentSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Nanoseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SnapshotError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshot",
    namespaced,
    status = "VolumeSnapshotStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    #[serde(default)]
    pub source: VolumeSnapshotSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "groupsnapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeGroupSnapshotContent",
    status = "VolumeGroupSnapshotContentStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotContentSpec {
    pub driver: String,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    pub source: GroupContentSource,
    #[serde(default)]
    pub volume_group_snapshot_ref: ObjectReference,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GroupContentSource {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_handles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_snapshot_handles: Option<GroupSnapshotHandles>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotHandles {
    pub volume_group_snapshot_handle: String,
    #[serde(default)]
    pub volume_snapshot_handles: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotContentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// RFC 3339 (a metav1.Time here, unlike the member's nanoseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_snapshot_info_list: Vec<VolumeSnapshotInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotInfo {
    pub volume_handle: String,
    pub snapshot_handle: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
}

/// The `parameters` of a snapshot class (VolumeSnapshotClass or VolumeGroupSnapshotClass, in
/// `group`/v1 as `plural`). These classes keep their fields beside metadata (no spec), so they are
/// read as dynamic objects. `None`: no such class.
pub async fn class_parameters(
    client: &kube::Client,
    group: &str,
    kind: &str,
    plural: &str,
    name: &str,
) -> kube::Result<Option<BTreeMap<String, String>>> {
    let gvk = kube::core::GroupVersionKind::gvk(group, "v1", kind);
    let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, plural);
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(client.clone(), &resource);
    let Some(class) = api.get_opt(name).await? else { return Ok(None) };
    let parameters = class.data.get("parameters").cloned().unwrap_or_default();
    Ok(Some(serde_json::from_value(parameters).unwrap_or_default()))
}

/// Whether the API server serves `resource` in `group_version` (the CRDs are optional: a cluster
/// without them gets no snapshot reconcilers, and plinth keeps checking until they appear).
pub async fn served(client: &kube::Client, group_version: &str, resource: &str) -> bool {
    match client.list_api_group_resources(group_version).await {
        Ok(list) => list.resources.iter().any(|r| r.name == resource),
        Err(_) => false,
    }
}

/// Returns once `resource` is served in `group_version`, checking every 30 s (it says once that
/// it waits): the snapshot CRDs may be installed after plinth.
pub async fn until_served(client: &kube::Client, group_version: &str, resource: &str) {
    let mut said = false;
    while !served(client, group_version, resource).await {
        if !said {
            tracing::info!(group_version, resource, "not served (snapshot CRDs not installed); checking every 30 s");
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    }
    tracing::info!(group_version, resource, "served: reconciling them");
}

/// `time` as a VolumeSnapshotContent's creationTime (ns) reads in a metav1.Time (RFC 3339).
pub fn rfc3339_from_nanos(nanos: i64) -> String {
    let seconds = nanos.div_euclid(1_000_000_000);
    let rest = nanos.rem_euclid(1_000_000_000) as i32;
    k8s_openapi::jiff::Timestamp::new(seconds, rest)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_snapshot_controller_writes() {
        let content: VolumeSnapshotContent = serde_json::from_value(serde_json::json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1", "annotations": {BEING_CREATED: "yes"}},
            "spec": {
                "driver": "plinth.csi.dev", "deletionPolicy": "Retain",
                "source": {"volumeHandle": "vol-0123"},
                "volumeSnapshotRef": {"kind": "VolumeSnapshot", "name": "s", "namespace": "default", "uid": "u-1"},
                "volumeSnapshotClassName": "plinth", "sourceVolumeMode": "Filesystem"
            },
            "status": {"snapshotHandle": "snap-1", "readyToUse": true, "creationTime": 1_700_000_000_123_456_789i64, "restoreSize": 1048576}
        }))
        .unwrap();
        assert_eq!(content.spec.deletion_policy, DeletionPolicy::Retain);
        assert_eq!(content.spec.source.volume_handle.as_deref(), Some("vol-0123"));
        assert_eq!(content.spec.volume_snapshot_ref.uid.as_deref(), Some("u-1"));
        let status = content.status.unwrap();
        assert_eq!((status.ready_to_use, status.restore_size), (Some(true), Some(1 << 20)));
        assert_eq!(rfc3339_from_nanos(1_700_000_000_123_456_789), "2023-11-14T22:13:20.123456789Z");
    }
}
