//! Snapshots over CSI in cluster mode, for the standard csi-snapshotter sidecar: CreateSnapshot,
//! DeleteSnapshot, ListSnapshots, GetSnapshot (served by `csi_controller::ClusterController`) and
//! the GroupController. Each drives the same `Snapshot` / `GroupSnapshot` objects through the
//! same `snapshots` functions as plinth's own content reconcilers — the node holding the data
//! does the work either way — and waits for the node's report, asking the sidecar to call again
//! (ABORTED) when it takes longer.
//!
//! One error enum per RPC; its `GrpcError` impl is the only place its codes are chosen.

use std::time::Duration;

use kube::ResourceExt;
use plinth_controller::rpc::{GrpcError, Rpc};
use plinth_engine::ids::SnapshotId;
use plinth_engine::model::check_snapshot_parameters;
use plinth_proto::csi_v1::{self as csi, group_controller_server::GroupController};
use tonic::{Code, Request, Response, Status};

use crate::crd::{GroupSnapshot, Phase, Snapshot};
use crate::csi_controller::kube_code;
use crate::snapshots::{self, Located, RequestError, settled};
use crate::volumes::{WaitError, wait_on};

fn wait_code(error: &WaitError) -> Code {
    match error {
        WaitError::TimedOut { .. } => Code::Aborted,
        WaitError::Watch { .. } => Code::Unavailable,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CreateSnapshotError {
    #[error("name is required")]
    NameMissing,
    #[error("source_volume_id is required")]
    SourceMissing,
    #[error(transparent)]
    Parameters(plinth_engine::Error),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("node {node} could not snapshot {source_volume_id}: {why}")]
    NodeFailed { node: String, source_volume_id: String, why: String },
    #[error("snapshot {0} was deleted while it was being taken; retry")]
    Vanished(String),
    #[error(transparent)]
    Wait(#[from] WaitError),
}

impl GrpcError for CreateSnapshotError {
    fn code(&self) -> Code {
        match self {
            Self::NameMissing | Self::SourceMissing => Code::InvalidArgument,
            Self::Parameters(e) => e.code(),
            Self::Request(e) => e.code(),
            // The node keeps retrying (a full pool may have room later): not final.
            Self::NodeFailed { .. } => Code::ResourceExhausted,
            Self::Vanished(_) => Code::Aborted,
            Self::Wait(e) => wait_code(e),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeleteSnapshotError {
    #[error("snapshot_id is required")]
    IdMissing,
    #[error("snapshot {id} belongs to group snapshot {group}: delete the group snapshot")]
    GroupMember { id: String, group: String },
    #[error("snapshot {id} is still on node {node}: its agent has not removed it yet")]
    StillThere { id: String, node: String },
    #[error("deleting snapshot {id} through the Kubernetes API")]
    Kube {
        id: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Wait(WaitError),
}

impl GrpcError for DeleteSnapshotError {
    fn code(&self) -> Code {
        match self {
            Self::IdMissing => Code::InvalidArgument,
            Self::GroupMember { .. } => Code::FailedPrecondition,
            // Not final: the node's agent may be restarting.
            Self::StillThere { .. } => Code::Aborted,
            Self::Kube { source, .. } => kube_code(source),
            Self::Wait(e) => wait_code(e),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("snapshot_id is required")]
    IdMissing,
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error(transparent)]
    Page(plinth_engine::Error),
    #[error("listing snapshots through the Kubernetes API")]
    Kube(#[source] kube::Error),
}

impl GrpcError for LookupError {
    fn code(&self) -> Code {
        match self {
            Self::IdMissing => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::Page(e) => e.code(),
            Self::Kube(source) => kube_code(source),
        }
    }
}

fn timestamp(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: nanos.div_euclid(1_000_000_000), nanos: nanos.rem_euclid(1_000_000_000) as i32 }
}

fn to_csi(found: &Located) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: found.size_bytes,
        snapshot_id: found.snapshot_id.clone(),
        source_volume_id: found.source_volume_id.clone(),
        creation_time: Some(timestamp(found.creation_time)),
        ready_to_use: found.ready,
        group_snapshot_id: found.group_snapshot_id.clone().unwrap_or_default(),
    }
}

/// The snapshot half of the cluster-mode CSI Controller.
pub struct ClusterSnapshots {
    pub client: kube::Client,
    pub wait: Duration,
}

impl ClusterSnapshots {
    pub async fn create(&self, req: &csi::CreateSnapshotRequest) -> Result<csi::Snapshot, CreateSnapshotError> {
        use CreateSnapshotError as E;
        if req.name.is_empty() {
            return Err(E::NameMissing);
        }
        if req.source_volume_id.is_empty() {
            return Err(E::SourceMissing);
        }
        check_snapshot_parameters(&req.parameters).map_err(E::Parameters)?;
        snapshots::request(&self.client, &req.name, &req.source_volume_id, None).await?;
        let settled_now = |s: Option<&Snapshot>| {
            s.is_none_or(|s| settled(s, Phase::Ready).is_some() || settled(s, Phase::Failed).is_some())
        };
        let snapshot = wait_on(snapshots::api(&self.client), "snapshot", &req.name, self.wait, settled_now)
            .await?
            .ok_or_else(|| E::Vanished(req.name.clone()))?;
        if let Some(why) = settled(&snapshot, Phase::Failed) {
            return Err(E::NodeFailed {
                node: snapshot.spec.node,
                source_volume_id: req.source_volume_id.clone(),
                why,
            });
        }
        let status = snapshot.status.clone().unwrap_or_default();
        Ok(to_csi(&Located {
            node: snapshot.spec.node.clone(),
            snapshot_id: status.snapshot_id.unwrap_or_else(|| snapshots::snapshot_id_for(&req.name).to_string()),
            source_volume_id: snapshot.spec.source_volume_id.clone(),
            size_bytes: status.size_bytes.unwrap_or(0),
            creation_time: status.creation_time.unwrap_or(0),
            ready: true,
            group_snapshot_id: None,
        }))
    }

    pub async fn delete(&self, id: &str) -> Result<(), DeleteSnapshotError> {
        use DeleteSnapshotError as E;
        if id.is_empty() {
            return Err(E::IdMissing);
        }
        let kube = |source| E::Kube { id: id.to_owned(), source };
        let Some(snapshot) = snapshots::remove(&self.client, id).await.map_err(kube)? else {
            if let Some(member) = snapshots::locate(&self.client, id).await.map_err(kube)?
                && let Some(group) = member.group_snapshot_id
            {
                return Err(E::GroupMember { id: id.to_owned(), group });
            }
            return Ok(());
        };
        let uid = snapshot.uid().unwrap_or_default();
        let gone = kube::runtime::wait::conditions::is_deleted(&uid);
        match wait_on(snapshots::api(&self.client), "snapshot", &snapshot.name_any(), self.wait, gone).await {
            Ok(_) => Ok(()),
            Err(WaitError::TimedOut { .. }) => Err(E::StillThere { id: id.to_owned(), node: snapshot.spec.node }),
            Err(other) => Err(E::Wait(other)),
        }
    }

    pub async fn list(&self, req: &csi::ListSnapshotsRequest) -> Result<csi::ListSnapshotsResponse, LookupError> {
        let all = snapshots::all(&self.client).await.map_err(LookupError::Kube)?;
        let matching: Vec<(SnapshotId, Located)> = all
            .into_iter()
            .filter(|s| req.snapshot_id.is_empty() || s.snapshot_id == req.snapshot_id)
            .filter(|s| req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id)
            .filter_map(|s| SnapshotId::parse(&s.snapshot_id).map(|id| (id, s)))
            .collect();
        let (page, next_token) =
            plinth_engine::page::page(matching, |(id, _)| id, &req.starting_token, req.max_entries)
                .map_err(LookupError::Page)?;
        let entries =
            page.iter().map(|(_, s)| csi::list_snapshots_response::Entry { snapshot: Some(to_csi(s)) }).collect();
        Ok(csi::ListSnapshotsResponse { entries, next_token })
    }

    pub async fn get(&self, id: &str) -> Result<csi::Snapshot, LookupError> {
        if id.is_empty() {
            return Err(LookupError::IdMissing);
        }
        let found = snapshots::locate(&self.client, id).await.map_err(LookupError::Kube)?;
        found.map(|s| to_csi(&s)).ok_or_else(|| LookupError::NotFound(id.to_owned()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error(transparent)]
    Parameters(plinth_engine::Error),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("group snapshot {0} does not exist")]
    NotFound(String),
    #[error("snapshot_ids do not match the members of group snapshot {0}")]
    Members(String),
    #[error("node {node} could not take group snapshot {name}: {why}")]
    NodeFailed { name: String, node: String, why: String },
    #[error("group snapshot {name} is still on node {node}: its agent has not removed it yet")]
    StillThere { name: String, node: String },
    #[error("group snapshot {0} was deleted while it was being taken; retry")]
    Vanished(String),
    #[error("group snapshot {id} through the Kubernetes API")]
    Kube {
        id: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Wait(#[from] WaitError),
}

impl GrpcError for GroupError {
    fn code(&self) -> Code {
        match self {
            Self::Missing(_) | Self::Members(_) => Code::InvalidArgument,
            Self::Parameters(e) => e.code(),
            Self::Request(e) => e.code(),
            Self::NotFound(_) => Code::NotFound,
            Self::NodeFailed { .. } => Code::ResourceExhausted,
            Self::StillThere { .. } | Self::Vanished(_) => Code::Aborted,
            Self::Kube { source, .. } => kube_code(source),
            Self::Wait(e) => wait_code(e),
        }
    }
}

fn to_csi_group(group: &GroupSnapshot) -> csi::VolumeGroupSnapshot {
    let status = group.status.clone().unwrap_or_default();
    let id = status.group_snapshot_id.clone().unwrap_or_default();
    let snapshots = status
        .members
        .iter()
        .map(|m| csi::Snapshot {
            size_bytes: m.size_bytes,
            snapshot_id: m.snapshot_id.clone(),
            source_volume_id: m.volume_id.clone(),
            creation_time: Some(timestamp(m.creation_time)),
            ready_to_use: true,
            group_snapshot_id: id.clone(),
        })
        .collect();
    csi::VolumeGroupSnapshot {
        group_snapshot_id: id,
        snapshots,
        creation_time: status.creation_time.map(timestamp),
        ready_to_use: settled(group, Phase::Ready).is_some(),
    }
}

/// Whether `given` (possibly empty: not checked) names exactly the group's members.
fn members_match(group: &GroupSnapshot, given: &[String]) -> bool {
    if given.is_empty() {
        return true;
    }
    let mut have: Vec<&str> = group.status.iter().flat_map(|s| &s.members).map(|m| m.snapshot_id.as_str()).collect();
    let mut given: Vec<&str> = given.iter().map(String::as_str).collect();
    have.sort_unstable();
    given.sort_unstable();
    have == given
}

/// The CSI GroupController in cluster mode.
pub struct ClusterGroupController {
    client: kube::Client,
    rpc: Rpc,
    wait: Duration,
}

impl ClusterGroupController {
    pub fn new(client: kube::Client, rpc: Rpc, wait: Duration) -> Self {
        Self { client, rpc, wait }
    }

    async fn create(
        &self,
        req: &csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::VolumeGroupSnapshot, GroupError> {
        if req.name.is_empty() {
            return Err(GroupError::Missing("name"));
        }
        check_snapshot_parameters(&req.parameters).map_err(GroupError::Parameters)?;
        snapshots::request_group(&self.client, &req.name, &req.source_volume_ids, None).await?;
        let settled_now = |g: Option<&GroupSnapshot>| {
            g.is_none_or(|g| settled(g, Phase::Ready).is_some() || settled(g, Phase::Failed).is_some())
        };
        let group = wait_on(snapshots::group_api(&self.client), "group snapshot", &req.name, self.wait, settled_now)
            .await?
            .ok_or_else(|| GroupError::Vanished(req.name.clone()))?;
        if let Some(why) = settled(&group, Phase::Failed) {
            return Err(GroupError::NodeFailed { name: req.name.clone(), node: group.spec.node, why });
        }
        Ok(to_csi_group(&group))
    }

    async fn delete(&self, req: &csi::DeleteVolumeGroupSnapshotRequest) -> Result<(), GroupError> {
        let id = &req.group_snapshot_id;
        if id.is_empty() {
            return Err(GroupError::Missing("group_snapshot_id"));
        }
        let kube = |source| GroupError::Kube { id: id.clone(), source };
        let Some(group) = snapshots::group_by_id(&self.client, id).await.map_err(kube)? else { return Ok(()) };
        if !members_match(&group, &req.snapshot_ids) {
            return Err(GroupError::Members(id.clone()));
        }
        snapshots::remove_group(&self.client, id).await.map_err(kube)?;
        let uid = group.uid().unwrap_or_default();
        let gone = kube::runtime::wait::conditions::is_deleted(&uid);
        match wait_on(snapshots::group_api(&self.client), "group snapshot", &group.name_any(), self.wait, gone).await {
            Ok(_) => Ok(()),
            Err(WaitError::TimedOut { .. }) => {
                Err(GroupError::StillThere { name: group.name_any(), node: group.spec.node })
            }
            Err(other) => Err(GroupError::Wait(other)),
        }
    }

    async fn get(&self, req: &csi::GetVolumeGroupSnapshotRequest) -> Result<csi::VolumeGroupSnapshot, GroupError> {
        let id = &req.group_snapshot_id;
        if id.is_empty() {
            return Err(GroupError::Missing("group_snapshot_id"));
        }
        let group = snapshots::group_by_id(&self.client, id)
            .await
            .map_err(|source| GroupError::Kube { id: id.clone(), source })?
            .ok_or_else(|| GroupError::NotFound(id.clone()))?;
        if !members_match(&group, &req.snapshot_ids) {
            return Err(GroupError::Members(id.clone()));
        }
        Ok(to_csi_group(&group))
    }
}

#[tonic::async_trait]
impl GroupController for ClusterGroupController {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(plinth_controller::group::capabilities()))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let group = self.rpc.run("CreateVolumeGroupSnapshot", &req.name, self.create(&req)).await?;
        Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse { group_snapshot: Some(group) }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        self.rpc.run("DeleteVolumeGroupSnapshot", &req.group_snapshot_id, self.delete(&req)).await?;
        Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let group = self.rpc.run("GetVolumeGroupSnapshot", &req.group_snapshot_id, self.get(&req)).await?;
        Ok(Response::new(csi::GetVolumeGroupSnapshotResponse { group_snapshot: Some(group) }))
    }
}

#[cfg(test)]
mod tests {
    use plinth_controller::rpc::status;

    use super::*;

    #[test]
    fn codes_say_whether_to_call_again() {
        let timed_out = WaitError::TimedOut { kind: "snapshot", name: "s".into(), within: Duration::from_secs(20) };
        assert_eq!(status(&CreateSnapshotError::Wait(timed_out)).code(), Code::Aborted, "not final: retry");
        let apart = RequestError::MembersApart { name: "g".into(), nodes: "vol-1 on a; vol-2 on b".into() };
        let status_apart = status(&GroupError::Request(apart));
        assert_eq!(status_apart.code(), Code::InvalidArgument);
        assert!(status_apart.message().contains("different nodes"), "{}", status_apart.message());
        assert_eq!(
            status(&CreateSnapshotError::Request(RequestError::SourceNotFound("vol-x".into()))).code(),
            Code::NotFound
        );
        let member = DeleteSnapshotError::GroupMember { id: "snap-1".into(), group: "group-1".into() };
        assert_eq!(status(&member).code(), Code::FailedPrecondition);
        let bad =
            CreateSnapshotError::Parameters(plinth_engine::Error::InvalidArgument("unknown snapshot parameter".into()));
        assert_eq!(status(&bad).code(), Code::InvalidArgument);
    }

    #[test]
    fn timestamps_split_into_seconds_and_nanos() {
        let t = timestamp(1_700_000_000_123_456_789);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_456_789));
    }
}
