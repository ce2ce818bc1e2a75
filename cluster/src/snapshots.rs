//! The `Snapshot` and `GroupSnapshot` API in one place, and the one implementation of "snapshot
//! these volumes where they live" that every path shares: plinth's own content reconcilers
//! (`snapshot_contents`, `group_contents`) and the CSI Controller for the csi-snapshotter sidecar
//! (`csi_snapshots`). A snapshot is taken by the agent of the node whose pool holds its source —
//! node-local data cannot move — through an object that agent reconciles (`agent_snapshots`),
//! exactly as a volume is made through a `Volume`.
//!
//! Names are the CSI names (the sidecar's `snapshot-<VolumeSnapshot uid>`; plinth's own path
//! uses the same), so both paths land on the same object and the same snapshot ID for the same
//! VolumeSnapshot, and retries never duplicate. An object is labelled with its node (the agent's
//! selector), its snapshot ID (lookups by handle), its source volume (ListSnapshots by source) and
//! the content that asked for it (so that content is reconciled again when the agent reports).

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use plinth_controller::rpc::GrpcError;
use plinth_engine::ids::{GroupSnapshotId, SnapshotId};
use tonic::Code;

use crate::crd::{GroupSnapshot, GroupSnapshotSpec, Phase, Snapshot, SnapshotSpec};
use crate::csi_controller::kube_code;
use crate::keys::{GROUP_SNAPSHOT_ID_LABEL, IMAGE_FINALIZER, NODE_LABEL, REQUESTED_BY_LABEL, SNAPSHOT_ID_LABEL};
use crate::volumes;

pub fn api(client: &kube::Client) -> Api<Snapshot> {
    Api::all(client.clone())
}

pub fn group_api(client: &kube::Client) -> Api<GroupSnapshot> {
    Api::all(client.clone())
}

/// The snapshot ID the node gives the Snapshot named `name` (derived from the name by the engine,
/// so it is known before the snapshot exists).
pub fn snapshot_id_for(name: &str) -> SnapshotId {
    SnapshotId::for_name(name)
}

pub fn group_snapshot_id_for(name: &str) -> GroupSnapshotId {
    GroupSnapshotId::for_name(name)
}

fn labels(node: &str, id_label: &str, id: &str, requested_by: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(NODE_LABEL.to_owned(), node.to_owned()), (id_label.to_owned(), id.to_owned())]);
    if let Some(content) = requested_by {
        labels.insert(REQUESTED_BY_LABEL.to_owned(), content.to_owned());
    }
    labels
}

/// A Snapshot as plinth creates it: labelled, and carrying the image finalizer from the start, so
/// deleting it always waits for the node to remove the snapshot's image.
pub fn new_snapshot(name: &str, spec: SnapshotSpec, requested_by: Option<&str>) -> Snapshot {
    let labels = labels(&spec.node, SNAPSHOT_ID_LABEL, snapshot_id_for(name).as_str(), requested_by);
    let mut snapshot = Snapshot::new(name, spec);
    snapshot.metadata.labels = Some(labels);
    snapshot.metadata.finalizers = Some(vec![IMAGE_FINALIZER.to_owned()]);
    snapshot
}

pub fn new_group(name: &str, spec: GroupSnapshotSpec, requested_by: Option<&str>) -> GroupSnapshot {
    let labels = labels(&spec.node, GROUP_SNAPSHOT_ID_LABEL, group_snapshot_id_for(name).as_str(), requested_by);
    let mut group = GroupSnapshot::new(name, spec);
    group.metadata.labels = Some(labels);
    group.metadata.finalizers = Some(vec![IMAGE_FINALIZER.to_owned()]);
    group
}

/// Why a snapshot cannot be requested. One code per failure, here only.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("source volume {0} does not exist")]
    SourceNotFound(String),
    #[error("snapshot {name} already exists for volume {existing}, not {requested}")]
    Incompatible { name: String, existing: String, requested: String },
    #[error("group snapshot {name} already exists with other volumes")]
    GroupIncompatible { name: String },
    #[error(
        "the volumes of group snapshot {name} are on different nodes ({nodes}): a group snapshot is \
         taken on one node, so all its volumes must be on the same node"
    )]
    MembersApart { name: String, nodes: String },
    #[error("a group snapshot needs at least one volume")]
    NoMembers,
    #[error("{what} through the Kubernetes API")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl GrpcError for RequestError {
    fn code(&self) -> Code {
        match self {
            Self::SourceNotFound(_) => Code::NotFound,
            Self::Incompatible { .. } | Self::GroupIncompatible { .. } => Code::AlreadyExists,
            Self::MembersApart { .. } | Self::NoMembers => Code::InvalidArgument,
            Self::Kube { source, .. } => kube_code(source),
        }
    }
}

/// Creates the Snapshot named `name` of `source_volume_id` on the node that holds the volume,
/// unless it exists. Returns it as it is now (the agent reports Ready or Failed).
pub async fn request(
    client: &kube::Client,
    name: &str,
    source_volume_id: &str,
    requested_by: Option<&str>,
) -> Result<Snapshot, RequestError> {
    let kube = |source| RequestError::Kube { what: format!("requesting snapshot {name}"), source };
    let snapshots = api(client);
    let compatible = |existing: Snapshot| {
        if existing.spec.source_volume_id == source_volume_id {
            Ok(existing)
        } else {
            Err(RequestError::Incompatible {
                name: name.to_owned(),
                existing: existing.spec.source_volume_id,
                requested: source_volume_id.to_owned(),
            })
        }
    };
    if let Some(existing) = snapshots.get_opt(name).await.map_err(kube)? {
        return compatible(existing);
    }
    let volume = volumes::by_volume_id(client, source_volume_id)
        .await
        .map_err(kube)?
        .ok_or_else(|| RequestError::SourceNotFound(source_volume_id.to_owned()))?;
    let spec = SnapshotSpec { node: volume.spec.node.clone(), source_volume_id: source_volume_id.to_owned() };
    match snapshots.create(&PostParams::default(), &new_snapshot(name, spec, requested_by)).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(e)) if e.code == 409 => compatible(snapshots.get(name).await.map_err(kube)?),
        Err(e) => Err(kube(e)),
    }
}

/// Creates the GroupSnapshot named `name` of `volume_ids`, which must all be on one node.
pub async fn request_group(
    client: &kube::Client,
    name: &str,
    volume_ids: &[String],
    requested_by: Option<&str>,
) -> Result<GroupSnapshot, RequestError> {
    let kube = |source| RequestError::Kube { what: format!("requesting group snapshot {name}"), source };
    let wanted: BTreeSet<&str> = volume_ids.iter().map(String::as_str).collect();
    if wanted.is_empty() {
        return Err(RequestError::NoMembers);
    }
    let groups = group_api(client);
    let compatible = |existing: GroupSnapshot| {
        let have: BTreeSet<&str> = existing.spec.source_volume_ids.iter().map(String::as_str).collect();
        if have == wanted { Ok(existing) } else { Err(RequestError::GroupIncompatible { name: name.to_owned() }) }
    };
    if let Some(existing) = groups.get_opt(name).await.map_err(kube)? {
        return compatible(existing);
    }
    let mut nodes: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for id in &wanted {
        let volume = volumes::by_volume_id(client, id)
            .await
            .map_err(kube)?
            .ok_or_else(|| RequestError::SourceNotFound((*id).to_owned()))?;
        nodes.entry(volume.spec.node).or_default().push(id);
    }
    if nodes.len() > 1 {
        let nodes = nodes.iter().map(|(node, ids)| format!("{} on {node}", ids.join(", "))).collect::<Vec<_>>();
        return Err(RequestError::MembersApart { name: name.to_owned(), nodes: nodes.join("; ") });
    }
    let node = nodes.into_keys().next().unwrap_or_default();
    let spec = GroupSnapshotSpec { node, source_volume_ids: wanted.iter().map(|id| (*id).to_owned()).collect() };
    match groups.create(&PostParams::default(), &new_group(name, spec, requested_by)).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(e)) if e.code == 409 => compatible(groups.get(name).await.map_err(kube)?),
        Err(e) => Err(kube(e)),
    }
}

/// The Snapshot whose snapshot ID is `id` (by label), if any.
pub async fn by_snapshot_id(client: &kube::Client, id: &str) -> kube::Result<Option<Snapshot>> {
    let Some(id) = SnapshotId::parse(id) else { return Ok(None) };
    let found = api(client).list(&ListParams::default().labels(&format!("{SNAPSHOT_ID_LABEL}={id}"))).await?;
    Ok(found.items.into_iter().find(|s| snapshot_id_for(&s.name_any()) == id))
}

pub async fn group_by_id(client: &kube::Client, id: &str) -> kube::Result<Option<GroupSnapshot>> {
    let Some(id) = GroupSnapshotId::parse(id) else { return Ok(None) };
    let selector = format!("{GROUP_SNAPSHOT_ID_LABEL}={id}");
    let found = group_api(client).list(&ListParams::default().labels(&selector)).await?;
    Ok(found.items.into_iter().find(|g| group_snapshot_id_for(&g.name_any()) == id))
}

/// Deletes the Snapshot (its agent then removes the image and the finalizer). Returns the object
/// as it was, or `None` when there is none (already gone: done).
pub async fn remove(client: &kube::Client, id: &str) -> kube::Result<Option<Snapshot>> {
    let Some(snapshot) = by_snapshot_id(client, id).await? else { return Ok(None) };
    delete_named(&api(client), &snapshot.name_any()).await?;
    Ok(Some(snapshot))
}

pub async fn remove_group(client: &kube::Client, id: &str) -> kube::Result<Option<GroupSnapshot>> {
    let Some(group) = group_by_id(client, id).await? else { return Ok(None) };
    delete_named(&group_api(client), &group.name_any()).await?;
    Ok(Some(group))
}

async fn delete_named<K>(api: &Api<K>, name: &str) -> kube::Result<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Where a snapshot (alone or a group's member) lives and what it is: what ListSnapshots,
/// restores and pre-provisioned contents need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub node: String,
    pub snapshot_id: String,
    pub source_volume_id: String,
    pub size_bytes: i64,
    /// Nanoseconds since the Unix epoch.
    pub creation_time: i64,
    pub ready: bool,
    pub group_snapshot_id: Option<String>,
}

fn located(snapshot: &Snapshot) -> Option<Located> {
    let status = snapshot.status.as_ref()?;
    Some(Located {
        node: snapshot.spec.node.clone(),
        snapshot_id: status.snapshot_id.clone()?,
        source_volume_id: snapshot.spec.source_volume_id.clone(),
        size_bytes: status.size_bytes.unwrap_or(0),
        creation_time: status.creation_time.unwrap_or(0),
        ready: status.phase == Some(Phase::Ready) && snapshot.metadata.deletion_timestamp.is_none(),
        group_snapshot_id: None,
    })
}

fn members(group: &GroupSnapshot) -> Vec<Located> {
    let Some(status) = group.status.as_ref() else { return Vec::new() };
    let ready = status.phase == Some(Phase::Ready) && group.metadata.deletion_timestamp.is_none();
    status
        .members
        .iter()
        .map(|m| Located {
            node: group.spec.node.clone(),
            snapshot_id: m.snapshot_id.clone(),
            source_volume_id: m.volume_id.clone(),
            size_bytes: m.size_bytes,
            creation_time: m.creation_time,
            ready,
            group_snapshot_id: status.group_snapshot_id.clone(),
        })
        .collect()
}

/// The snapshot with CSI ID `id`, alone or in a group; `None` if no node has it.
pub async fn locate(client: &kube::Client, id: &str) -> kube::Result<Option<Located>> {
    if let Some(snapshot) = by_snapshot_id(client, id).await? {
        return Ok(located(&snapshot));
    }
    if SnapshotId::parse(id).is_none() {
        return Ok(None);
    }
    // Group members' IDs are not labels (a group has many); groups are few, so look through them.
    let groups = group_api(client).list(&ListParams::default()).await?;
    Ok(groups.items.iter().flat_map(members).find(|m| m.snapshot_id == id))
}

/// Every snapshot plinth's nodes hold (taken, alone or in groups), in snapshot-ID order.
pub async fn all(client: &kube::Client) -> kube::Result<Vec<Located>> {
    let mut found: Vec<Located> =
        api(client).list(&ListParams::default()).await?.items.iter().filter_map(located).collect();
    found.extend(group_api(client).list(&ListParams::default()).await?.items.iter().flat_map(members));
    found.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
    Ok(found)
}

/// The agent has acted on the object's current spec and reported `phase`.
pub fn settled<S: HasStatus>(object: &S, phase: Phase) -> Option<String> {
    let (current, message) = object.phase_for_generation()?;
    (current == phase).then(|| message.unwrap_or_default())
}

/// What `settled` needs of Snapshot and GroupSnapshot.
pub trait HasStatus {
    /// The phase and message the agent reported for the current generation.
    fn phase_for_generation(&self) -> Option<(Phase, Option<String>)>;
}

impl HasStatus for Snapshot {
    fn phase_for_generation(&self) -> Option<(Phase, Option<String>)> {
        let status = self.status.as_ref()?;
        (status.observed_generation == self.metadata.generation).then_some(())?;
        Some((status.phase?, status.message.clone()))
    }
}

impl HasStatus for GroupSnapshot {
    fn phase_for_generation(&self) -> Option<(Phase, Option<String>)> {
        let status = self.status.as_ref()?;
        (status.observed_generation == self.metadata.generation).then_some(())?;
        Some((status.phase?, status.message.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{MemberSnapshot, SnapshotStatus};

    #[test]
    fn new_objects_carry_their_labels_and_finalizer() {
        let spec = SnapshotSpec { node: "node-a".into(), source_volume_id: "vol-1".into() };
        let snapshot = new_snapshot("snapshot-1", spec, Some("snapcontent-1"));
        assert_eq!(snapshot.labels()[NODE_LABEL], "node-a");
        assert_eq!(snapshot.labels()[SNAPSHOT_ID_LABEL], SnapshotId::for_name("snapshot-1").as_str());
        assert_eq!(snapshot.labels()[REQUESTED_BY_LABEL], "snapcontent-1");
        assert_eq!(snapshot.finalizers(), [IMAGE_FINALIZER]);
        let group = new_group(
            "groupsnapshot-1",
            GroupSnapshotSpec { node: "node-b".into(), source_volume_ids: vec!["vol-1".into()] },
            None,
        );
        assert_eq!(group.labels()[GROUP_SNAPSHOT_ID_LABEL], GroupSnapshotId::for_name("groupsnapshot-1").as_str());
        assert!(!group.labels().contains_key(REQUESTED_BY_LABEL));
    }

    #[test]
    fn a_snapshot_is_ready_only_when_reported_for_its_current_spec_and_not_going() {
        let mut snapshot = new_snapshot("s", SnapshotSpec { node: "a".into(), source_volume_id: "vol-1".into() }, None);
        snapshot.metadata.generation = Some(1);
        assert!(located(&snapshot).is_none(), "no status: not taken yet");
        snapshot.status = Some(SnapshotStatus {
            phase: Some(Phase::Ready),
            snapshot_id: Some("snap-1".into()),
            size_bytes: Some(5),
            creation_time: Some(7),
            observed_generation: Some(1),
            ..Default::default()
        });
        let found = located(&snapshot).unwrap();
        assert!(found.ready && found.node == "a" && found.size_bytes == 5);
        assert_eq!(settled(&snapshot, Phase::Ready), Some(String::new()));
        assert_eq!(settled(&snapshot, Phase::Failed), None);
        snapshot.metadata.generation = Some(2);
        assert_eq!(settled(&snapshot, Phase::Ready), None, "reported for an older spec");
        snapshot.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(!located(&snapshot).unwrap().ready, "a snapshot being deleted restores nothing");
    }

    #[test]
    fn group_members_are_found_by_their_own_ids() {
        let mut group = new_group(
            "g",
            GroupSnapshotSpec { node: "b".into(), source_volume_ids: vec!["vol-1".into(), "vol-2".into()] },
            None,
        );
        group.status = Some(crate::crd::GroupSnapshotStatus {
            phase: Some(Phase::Ready),
            group_snapshot_id: Some("group-1".into()),
            members: vec![
                MemberSnapshot {
                    volume_id: "vol-1".into(),
                    snapshot_id: "snap-a".into(),
                    size_bytes: 1,
                    creation_time: 2,
                },
                MemberSnapshot {
                    volume_id: "vol-2".into(),
                    snapshot_id: "snap-b".into(),
                    size_bytes: 3,
                    creation_time: 2,
                },
            ],
            ..Default::default()
        });
        let found = members(&group);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].source_volume_id, "vol-2");
        assert_eq!(found[1].group_snapshot_id.as_deref(), Some("group-1"));
        assert!(found.iter().all(|m| m.ready && m.node == "b"));
    }
}
