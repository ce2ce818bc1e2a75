//! A claim's data source (`dataSourceRef`, else `dataSource`), resolved to where its data lives:
//! a VolumeSnapshot of a plinth volume (restore) or a bound claim of a plinth volume (clone), in
//! the claim's namespace. The new volume is copied on the node that holds the source: plinth's
//! data is node-local and never moves. Anything else is refused out loud — a provisioner that
//! ignored a data source would hand out an empty volume where the user asked for data.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::Api;
use kube::{Resource, ResourceExt};
use plinth_proto::DRIVER_NAME;

use crate::crd::{Phase, VolumeSource};
use crate::snapshot_api::{SNAPSHOT_GROUP, VolumeSnapshot, VolumeSnapshotContent};
use crate::{snapshots, volumes};

/// Where a new volume's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The node whose pool holds the source: the new volume is made there.
    pub node: String,
    pub content: VolumeSource,
    /// The source's size: the smallest the new volume can be.
    pub size_bytes: i64,
    /// "VolumeSnapshot apps/nightly", for events.
    pub describe: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "plinth cannot populate a volume from {kind} {name} (API group {group:?}): it restores \
         snapshot.storage.k8s.io VolumeSnapshots and clones PersistentVolumeClaims"
    )]
    Unsupported { group: String, kind: String, name: String },
    #[error(
        "the data source {what} is in namespace {namespace}: plinth takes data sources from the claim's own namespace only"
    )]
    OtherNamespace { what: String, namespace: String },
    #[error("{what} does not exist (yet)")]
    Missing { what: String },
    #[error("{what} is not ready to use yet: {why}")]
    NotReady { what: String, why: String },
    #[error("{what} is not plinth's: {why}")]
    NotPlinth { what: String, why: String },
    #[error("reading {what} through the Kubernetes API")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl SourceError {
    /// Whether waiting can fix it (the source may appear or become ready); the others need the
    /// claim to change.
    pub fn may_resolve(&self) -> bool {
        matches!(self, Self::Missing { .. } | Self::NotReady { .. } | Self::Kube { .. })
    }
}

/// The (API group, kind, name, namespace) the claim names as its data source, if any.
fn reference(claim: &PersistentVolumeClaim) -> Option<(String, String, String, Option<String>)> {
    let spec = claim.spec.as_ref()?;
    if let Some(r) = &spec.data_source_ref {
        return Some((r.api_group.clone().unwrap_or_default(), r.kind.clone(), r.name.clone(), r.namespace.clone()));
    }
    let r = spec.data_source.as_ref()?;
    Some((r.api_group.clone().unwrap_or_default(), r.kind.clone(), r.name.clone(), None))
}

/// The claim's data source, resolved; `None` for a claim without one (a blank volume).
pub async fn resolve(client: &kube::Client, claim: &PersistentVolumeClaim) -> Result<Option<Source>, SourceError> {
    let Some((group, kind, name, namespace)) = reference(claim) else { return Ok(None) };
    let claim_namespace = claim.namespace().unwrap_or_default();
    let what = format!("{kind} {claim_namespace}/{name}");
    if let Some(namespace) = namespace.filter(|n| *n != claim_namespace) {
        return Err(SourceError::OtherNamespace { what: format!("{kind} {namespace}/{name}"), namespace });
    }
    let kube = |what: &str| {
        let what = what.to_owned();
        move |source| SourceError::Kube { what, source }
    };
    match (group.as_str(), kind.as_str()) {
        (SNAPSHOT_GROUP, "VolumeSnapshot") => {
            let snapshots_api: Api<VolumeSnapshot> = Api::namespaced(client.clone(), &claim_namespace);
            let snapshot = snapshots_api
                .get_opt(&name)
                .await
                .map_err(kube(&what))?
                .ok_or(SourceError::Missing { what: what.clone() })?;
            from_snapshot(client, &snapshot, what).await.map(Some)
        }
        ("", "PersistentVolumeClaim") => {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &claim_namespace);
            let source =
                claims.get_opt(&name).await.map_err(kube(&what))?.ok_or(SourceError::Missing { what: what.clone() })?;
            from_claim(client, &source, what).await.map(Some)
        }
        _ => Err(SourceError::Unsupported { group, kind, name }),
    }
}

async fn from_snapshot(client: &kube::Client, snapshot: &VolumeSnapshot, what: String) -> Result<Source, SourceError> {
    let not_ready = |why: &str| SourceError::NotReady { what: what.clone(), why: why.to_owned() };
    let status = snapshot.status.clone().unwrap_or_default();
    let Some(content_name) = status.bound_volume_snapshot_content_name else {
        return Err(not_ready("it is bound to no VolumeSnapshotContent"));
    };
    if status.ready_to_use != Some(true) {
        return Err(not_ready("it is not readyToUse"));
    }
    let contents: Api<VolumeSnapshotContent> = Api::all(client.clone());
    let content = contents
        .get_opt(&content_name)
        .await
        .map_err(|source| SourceError::Kube { what: format!("VolumeSnapshotContent {content_name}"), source })?
        .ok_or_else(|| not_ready("its VolumeSnapshotContent is gone"))?;
    if content.spec.driver != DRIVER_NAME {
        let why = format!("its content is driver {}'s", content.spec.driver);
        return Err(SourceError::NotPlinth { what, why });
    }
    let handle =
        content.status.and_then(|s| s.snapshot_handle).ok_or_else(|| not_ready("its content has no snapshotHandle"))?;
    let located = snapshots::locate(client, &handle)
        .await
        .map_err(|source| SourceError::Kube { what: format!("plinth snapshot {handle}"), source })?
        .ok_or_else(|| SourceError::NotPlinth {
            what: what.clone(),
            why: format!("no plinth node holds snapshot {handle}"),
        })?;
    if !located.ready {
        return Err(not_ready(&format!("snapshot {handle} is not taken yet on node {}", located.node)));
    }
    Ok(Source {
        node: located.node,
        content: VolumeSource::Snapshot(handle),
        size_bytes: located.size_bytes,
        describe: what,
    })
}

async fn from_claim(
    client: &kube::Client,
    source: &PersistentVolumeClaim,
    what: String,
) -> Result<Source, SourceError> {
    let not_ready = |why: &str| SourceError::NotReady { what: what.clone(), why: why.to_owned() };
    if source.meta().deletion_timestamp.is_some() {
        return Err(SourceError::Missing { what });
    }
    let bound = source.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let pv_name = source.spec.as_ref().and_then(|s| s.volume_name.clone()).filter(|n| !n.is_empty());
    let Some(pv_name) = pv_name.filter(|_| bound) else { return Err(not_ready("it is not Bound")) };
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get_opt(&pv_name)
        .await
        .map_err(|source| SourceError::Kube { what: format!("PersistentVolume {pv_name}"), source })?
        .ok_or_else(|| not_ready("its PersistentVolume is gone"))?;
    let csi = pv.spec.and_then(|s| s.csi).filter(|c| c.driver == DRIVER_NAME);
    let Some(handle) = csi.map(|c| c.volume_handle) else {
        return Err(SourceError::NotPlinth { what, why: format!("PersistentVolume {pv_name} is not a plinth volume") });
    };
    let volume = volumes::by_volume_id(client, &handle)
        .await
        .map_err(|source| SourceError::Kube { what: format!("plinth volume {handle}"), source })?
        .ok_or_else(|| SourceError::NotPlinth {
            what: what.clone(),
            why: format!("no plinth Volume has ID {handle}"),
        })?;
    let status = volume.status.clone().unwrap_or_default();
    if status.phase != Some(Phase::Ready) {
        return Err(not_ready(&format!("its volume {handle} is not Ready on node {}", volume.spec.node)));
    }
    Ok(Source {
        node: volume.spec.node.clone(),
        content: VolumeSource::Volume(handle),
        size_bytes: status.capacity_bytes.unwrap_or(volume.spec.size_bytes),
        describe: what,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(spec: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "c", "namespace": "apps"}, "spec": spec}))
            .unwrap()
    }

    #[test]
    fn the_ref_wins_over_the_plain_data_source() {
        let both = claim(serde_json::json!({
            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "old"},
            "dataSourceRef": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "new", "namespace": "other"}
        }));
        let (group, kind, name, namespace) = reference(&both).unwrap();
        assert_eq!(
            (group.as_str(), kind.as_str(), name.as_str()),
            ("snapshot.storage.k8s.io", "VolumeSnapshot", "new")
        );
        assert_eq!(namespace.as_deref(), Some("other"));
        let clone = claim(serde_json::json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": "src"}}));
        assert_eq!(reference(&clone).unwrap().0, "", "the core group is empty");
        assert_eq!(reference(&claim(serde_json::json!({}))), None);
    }

    #[test]
    fn only_waiting_can_fix_some_problems() {
        assert!(SourceError::NotReady { what: "x".into(), why: "y".into() }.may_resolve());
        assert!(SourceError::Missing { what: "x".into() }.may_resolve());
        let unsupported = SourceError::Unsupported { group: "acme.io".into(), kind: "Backup".into(), name: "b".into() };
        assert!(!unsupported.may_resolve());
        assert!(unsupported.to_string().contains("cannot populate a volume from Backup b"), "{unsupported}");
    }
}
