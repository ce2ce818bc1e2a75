//! The CSI Controller service in cluster mode, for the standard external-provisioner,
//! external-resizer and csi-snapshotter sidecars. It drives the same `Volume`, `Snapshot` and
//! `GroupSnapshot` objects through the same helpers (`volumes`, `snapshots`, `modify`) as plinth's
//! own reconcilers, so the node agents do the disk work either way: a volume with a content
//! source is made on the node holding the source, a snapshot on the node holding its volume.
//!
//! Every RPC runs through the shared boundary (`plinth_controller::rpc::Rpc`: logged once,
//! counted in `/metrics`), and each has its own error enum whose `GrpcError` impl is the one
//! place its failures get a gRPC code. Codes matter to the sidecars: ABORTED, UNAVAILABLE and
//! RESOURCE_EXHAUSTED mean "not final, call again with the same name".

use std::time::Duration;

use kube::ResourceExt;
use plinth_controller::controller::{capabilities_response, check_capabilities, validation_response};
use plinth_controller::params::ClassParameters;
use plinth_controller::rpc::{GrpcError, Rpc, Unimplemented};
use plinth_controller::topology::{named_nodes, node_topology, requested_node};
use plinth_engine::caps::{AccessType, Capability};
use plinth_engine::model::{FsType, MutableParameters};
use plinth_engine::size::{GIB, MIB, resolve_capacity};
use plinth_proto::TOPOLOGY_NODE_KEY;
use plinth_proto::csi_v1::{self as csi, controller_server::Controller, controller_service_capability};
use tonic::{Code, Request, Response, Status};

use crate::crd::{Phase, Volume, VolumeMode, VolumeSource, VolumeSpec, reason};
use crate::csi_snapshots::ClusterSnapshots;
use crate::modify::{self, ModifyError, Progress};
use crate::snapshots;
use crate::volumes::{self, WaitError};

/// How long one RPC waits for the node agent before asking the sidecar to retry (it will, with
/// the same name: idempotent).
const WAIT: Duration = Duration::from_secs(20);

pub struct ClusterController {
    client: kube::Client,
    rpc: Rpc,
    wait: Duration,
}

impl ClusterController {
    pub fn new(client: kube::Client, rpc: Rpc) -> Self {
        Self { client, rpc, wait: WAIT }
    }

    /// How long an RPC waits for the node agent (tests shorten it).
    pub fn with_wait(self, wait: Duration) -> Self {
        Self { wait, ..self }
    }

    /// How long an RPC waits for a node agent, for the other cluster-mode CSI services.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    fn snapshots(&self) -> ClusterSnapshots {
        ClusterSnapshots { client: self.client.clone(), wait: self.wait }
    }
}

/// The code a Kubernetes API failure is reported with.
pub fn kube_code(error: &kube::Error) -> Code {
    match error {
        kube::Error::Api(status) => match status.code {
            404 => Code::NotFound,
            // A write lost a race (conflict) or a watch expired: the same call again will do.
            409 | 410 => Code::Aborted,
            401 | 403 => Code::PermissionDenied,
            429 | 500..=599 => Code::Unavailable,
            _ => Code::Internal,
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => Code::Unavailable,
        _ => Code::Internal,
    }
}

fn wait_code(error: &WaitError) -> Code {
    match error {
        WaitError::TimedOut { .. } => Code::Aborted,
        WaitError::Watch { .. } => Code::Unavailable,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CreateVolumeError {
    #[error("name is required")]
    NameMissing,
    #[error("volume_content_source names neither a snapshot nor a volume")]
    ContentSourceEmpty,
    #[error("content source {0} does not exist on any plinth node")]
    SourceNotFound(String),
    #[error("content source {id} is not ready yet on node {node}")]
    SourceNotReady { id: String, node: String },
    #[error(
        "content source {id} is on node {node}, which the accessibility requirements exclude: plinth \
         volumes are node-local, so a copy is made where its source is"
    )]
    SourceElsewhere { id: String, node: String },
    #[error("no {TOPOLOGY_NODE_KEY} in accessibility_requirements: run external-provisioner with topology enabled")]
    NoNode,
    #[error(transparent)]
    Request(plinth_engine::Error),
    #[error("volume {name} exists with a different node, mode or size")]
    Incompatible { name: String },
    /// `code`: what the node's engine answered (RESOURCE_EXHAUSTED, on which external-provisioner
    /// asks the scheduler for another node, when it did not say).
    #[error("node {node} could not create volume {name}: {why}")]
    NodeFailed { name: String, node: String, why: String, code: Code },
    #[error("volume {name} was deleted while it was being created; retry")]
    Vanished { name: String },
    #[error("creating volume {name} through the Kubernetes API")]
    Kube {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Wait(#[from] WaitError),
}

impl GrpcError for CreateVolumeError {
    fn code(&self) -> Code {
        match self {
            Self::NameMissing | Self::ContentSourceEmpty | Self::NoNode => Code::InvalidArgument,
            Self::SourceNotFound(_) => Code::NotFound,
            Self::SourceNotReady { .. } => Code::Unavailable,
            // What CSI says when the topology cannot be met; external-provisioner reschedules.
            Self::SourceElsewhere { .. } => Code::ResourceExhausted,
            Self::Request(e) => e.code(),
            Self::Incompatible { .. } => Code::AlreadyExists,
            Self::NodeFailed { code, .. } => *code,
            Self::Vanished { .. } => Code::Aborted,
            Self::Kube { source, .. } => kube_code(source),
            Self::Wait(e) => wait_code(e),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeleteVolumeError {
    #[error("volume_id is required")]
    IdMissing,
    #[error("volume {name} is still there: {why}")]
    StillThere { name: String, why: String },
    #[error("deleting volume {id} through the Kubernetes API")]
    Kube {
        id: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Wait(WaitError),
}

impl GrpcError for DeleteVolumeError {
    fn code(&self) -> Code {
        match self {
            Self::IdMissing => Code::InvalidArgument,
            // Staged or published on its node: storage never vanishes under a pod.
            Self::StillThere { .. } => Code::FailedPrecondition,
            Self::Kube { source, .. } => kube_code(source),
            Self::Wait(e) => wait_code(e),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExpandVolumeError {
    #[error("volume_id is required")]
    IdMissing,
    #[error("capacity_range is required")]
    RangeMissing,
    #[error("volume {0} does not exist")]
    NotFound(String),
    #[error(transparent)]
    Request(plinth_engine::Error),
    #[error("node {node} could not grow volume {name}: {why}")]
    NodeFailed { name: String, node: String, why: String, code: Code },
    #[error("volume {name} was deleted while it was being expanded")]
    Vanished { name: String },
    #[error("expanding volume {id} through the Kubernetes API")]
    Kube {
        id: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Wait(#[from] WaitError),
}

impl GrpcError for ExpandVolumeError {
    fn code(&self) -> Code {
        match self {
            Self::IdMissing | Self::RangeMissing => Code::InvalidArgument,
            Self::NotFound(_) | Self::Vanished { .. } => Code::NotFound,
            Self::Request(e) => e.code(),
            Self::NodeFailed { code, .. } => *code,
            Self::Kube { source, .. } => kube_code(source),
            Self::Wait(e) => wait_code(e),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("volume_id is required")]
    IdMissing,
    #[error("volume_capabilities is required")]
    CapabilitiesMissing,
    #[error("volume {0} does not exist")]
    NotFound(String),
    #[error("looking up volume {id} through the Kubernetes API")]
    Kube {
        id: String,
        #[source]
        source: kube::Error,
    },
}

impl GrpcError for ValidateError {
    fn code(&self) -> Code {
        match self {
            Self::IdMissing | Self::CapabilitiesMissing => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::Kube { source, .. } => kube_code(source),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModifyVolumeError {
    #[error("volume_id is required")]
    IdMissing,
    #[error(transparent)]
    Modify(#[from] ModifyError),
}

impl GrpcError for ModifyVolumeError {
    fn code(&self) -> Code {
        match self {
            Self::IdMissing => Code::InvalidArgument,
            Self::Modify(e) => e.code(),
        }
    }
}

fn phase(volume: &Volume) -> Option<Phase> {
    volume.status.as_ref().and_then(|s| s.phase)
}

/// The CSI code of the node's failure, from the reason its agent reported; RESOURCE_EXHAUSTED
/// when it gave none (agents before the reason existed).
fn node_failure_code(volume: &Volume) -> Code {
    volume.status.as_ref().and_then(|s| s.reason.as_deref()).and_then(reason::code).unwrap_or(Code::ResourceExhausted)
}

/// The agent has acted on the Volume's current spec (not an older one) and reported Failed.
fn failed_for_current_spec(volume: &Volume) -> Option<String> {
    let status = volume.status.as_ref()?;
    let current = status.observed_generation.is_some() && status.observed_generation == volume.metadata.generation;
    (status.phase == Some(Phase::Failed) && current)
        .then(|| status.message.clone().unwrap_or_else(|| "the node could not do it".into()))
}

fn to_csi(volume: &Volume) -> csi::Volume {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource as CsiVolumeSource};
    let status = volume.status.clone().unwrap_or_default();
    let content_source = volume.spec.content_source.as_ref().map(|source| csi::VolumeContentSource {
        r#type: Some(match source {
            VolumeSource::Snapshot(id) => Type::Snapshot(SnapshotSource { snapshot_id: id.clone() }),
            VolumeSource::Volume(id) => Type::Volume(CsiVolumeSource { volume_id: id.clone() }),
        }),
    });
    csi::Volume {
        capacity_bytes: status.capacity_bytes.unwrap_or(volume.spec.size_bytes),
        volume_id: status.volume_id.unwrap_or_default(),
        volume_context: volume.volume_context().to_map(),
        content_source,
        accessible_topology: vec![node_topology(&volume.spec.node)],
    }
}

/// The content source a CreateVolume names, if any.
fn requested_source(req: &csi::CreateVolumeRequest) -> Result<Option<VolumeSource>, CreateVolumeError> {
    use csi::volume_content_source::Type;
    match req.volume_content_source.as_ref().map(|s| s.r#type.as_ref()) {
        None => Ok(None),
        Some(Some(Type::Snapshot(s))) => Ok(Some(VolumeSource::Snapshot(s.snapshot_id.clone()))),
        Some(Some(Type::Volume(v))) => Ok(Some(VolumeSource::Volume(v.volume_id.clone()))),
        Some(None) => Err(CreateVolumeError::ContentSourceEmpty),
    }
}

/// Moves a spec with a content source to the node holding the source (node-local data cannot
/// move), which the request's requisite topology must allow; a copy is at least its source's size.
async fn place_copy(
    client: &kube::Client,
    req: &csi::CreateVolumeRequest,
    spec: &mut VolumeSpec,
) -> Result<(), CreateVolumeError> {
    use CreateVolumeError as E;
    let Some(source) = spec.content_source.clone() else { return Ok(()) };
    let kube = |source| E::Kube { name: req.name.clone(), source };
    let (id, node, size, ready) = match &source {
        VolumeSource::Snapshot(id) => {
            let found =
                snapshots::locate(client, id).await.map_err(kube)?.ok_or_else(|| E::SourceNotFound(id.clone()))?;
            (id, found.node, found.size_bytes, found.ready)
        }
        VolumeSource::Volume(id) => {
            let volume =
                volumes::by_volume_id(client, id).await.map_err(kube)?.ok_or_else(|| E::SourceNotFound(id.clone()))?;
            let status = volume.status.clone().unwrap_or_default();
            let ready = status.phase == Some(Phase::Ready);
            (id, volume.spec.node.clone(), status.capacity_bytes.unwrap_or(volume.spec.size_bytes), ready)
        }
    };
    if !ready {
        return Err(E::SourceNotReady { id: id.clone(), node });
    }
    let requisite = req.accessibility_requirements.as_ref().and_then(|r| named_nodes(&r.requisite));
    if requisite.is_some_and(|nodes| !nodes.contains(&node)) {
        return Err(E::SourceElsewhere { id: id.clone(), node });
    }
    spec.node = node;
    spec.size_bytes = spec.size_bytes.max(size);
    Ok(())
}

/// What a CreateVolume asks for, as a `Volume` spec (before `place_copy` for a content source).
fn requested_spec(req: &csi::CreateVolumeRequest) -> Result<VolumeSpec, CreateVolumeError> {
    use CreateVolumeError as E;
    let content_source = requested_source(req)?;
    let capabilities = Capability::parse_all(&req.volume_capabilities).map_err(E::Request)?;
    let parameters = ClassParameters::parse(&req.parameters).map_err(E::Request)?;
    let mount_fs = capabilities.iter().find_map(|c| match &c.access_type {
        AccessType::Mount { fs_type, .. } => Some(fs_type.or(parameters.fs_type).unwrap_or(FsType::Ext4)),
        AccessType::Block => None,
    });
    // A copy goes where its source is (`place_copy`); the topology is checked there.
    let node = match requested_node(req.accessibility_requirements.as_ref()) {
        Some(node) => node,
        None if content_source.is_some() => String::new(),
        None => return Err(E::NoNode),
    };
    let range = req.capacity_range.unwrap_or_default();
    let minimum = mount_fs.map_or(MIB, FsType::minimum_bytes);
    let size = resolve_capacity(range.required_bytes, range.limit_bytes, GIB, minimum).map_err(E::Request)?;
    Ok(VolumeSpec {
        node,
        size_bytes: size as i64,
        volume_mode: if mount_fs.is_some() { VolumeMode::Filesystem } else { VolumeMode::Block },
        fs_type: mount_fs,
        provisioning: parameters.provisioning,
        mkfs_options: parameters.mkfs_options,
        claim_ref: None,
        content_source,
    })
}

impl ClusterController {
    async fn create(&self, req: &csi::CreateVolumeRequest) -> Result<csi::Volume, CreateVolumeError> {
        use CreateVolumeError as E;
        if req.name.is_empty() {
            return Err(E::NameMissing);
        }
        let name = req.name.clone();
        let mut spec = requested_spec(req)?;
        let kube = |source| E::Kube { name: name.clone(), source };
        let existing = volumes::api(&self.client).get_opt(&name).await.map_err(kube)?;
        if existing.is_none() {
            place_copy(&self.client, req, &mut spec).await?;
        } else if spec.content_source.is_some() {
            // Made already: it is where its source is (checked below against the request).
            spec.node = existing.as_ref().map(|v| v.spec.node.clone()).unwrap_or_default();
        }
        let (existing, _) = volumes::ensure(&self.client, &name, spec.clone()).await.map_err(kube)?;
        if existing.spec.node != spec.node
            || existing.spec.volume_mode != spec.volume_mode
            || existing.spec.size_bytes < spec.size_bytes
            || existing.spec.content_source != spec.content_source
        {
            return Err(E::Incompatible { name });
        }
        let settled = volumes::wait_for(&self.client, &name, self.wait, |v: Option<&Volume>| {
            v.is_none_or(|v| matches!(phase(v), Some(Phase::Ready | Phase::Failed)))
        })
        .await?;
        let Some(volume) = settled else { return Err(E::Vanished { name }) };
        if phase(&volume) == Some(Phase::Ready) {
            return Ok(to_csi(&volume));
        }
        // Failed: leave nothing behind (the agent drops its finalizer once there is no image),
        // so the sidecar's retry may land on another node.
        volumes::delete(&self.client, &name).await.map_err(kube)?;
        let code = node_failure_code(&volume);
        let why = volume.status.and_then(|s| s.message).unwrap_or_else(|| "the node could not create it".into());
        Err(E::NodeFailed { name, node: volume.spec.node, why, code })
    }

    async fn delete(&self, id: &str) -> Result<(), DeleteVolumeError> {
        use DeleteVolumeError as E;
        if id.is_empty() {
            return Err(E::IdMissing);
        }
        let kube = |source| E::Kube { id: id.to_owned(), source };
        let Some(volume) = volumes::by_volume_id(&self.client, id).await.map_err(kube)? else {
            return Ok(());
        };
        let name = volume.name_any();
        volumes::delete(&self.client, &name).await.map_err(kube)?;
        let uid = volume.uid().unwrap_or_default();
        let gone = kube::runtime::wait::conditions::is_deleted(&uid);
        match volumes::wait_for(&self.client, &name, self.wait, gone).await {
            Ok(_) => Ok(()),
            Err(WaitError::TimedOut { .. }) => {
                let now = volumes::api(&self.client).get_opt(&name).await.map_err(kube)?;
                let why = now.and_then(|v| v.status).and_then(|s| s.message);
                Err(E::StillThere { name, why: why.unwrap_or_else(|| "its node has not removed it yet".into()) })
            }
            Err(other) => Err(E::Wait(other)),
        }
    }

    async fn expand(&self, req: &csi::ControllerExpandVolumeRequest) -> Result<i64, ExpandVolumeError> {
        use ExpandVolumeError as E;
        if req.volume_id.is_empty() {
            return Err(E::IdMissing);
        }
        let range = req.capacity_range.ok_or(E::RangeMissing)?;
        let kube = |source| E::Kube { id: req.volume_id.clone(), source };
        let volume = volumes::by_volume_id(&self.client, &req.volume_id)
            .await
            .map_err(kube)?
            .ok_or_else(|| E::NotFound(req.volume_id.clone()))?;
        let name = volume.name_any();
        let wanted = resolve_capacity(range.required_bytes, range.limit_bytes, 0, MIB).map_err(E::Request)? as i64;
        if wanted > volume.spec.size_bytes {
            volumes::request_growth(&self.client, &name, wanted).await.map_err(kube)?;
        }
        let grown = |v: &Volume| v.status.as_ref().and_then(|s| s.capacity_bytes).unwrap_or(0) >= wanted;
        let settled = volumes::wait_for(&self.client, &name, self.wait, |v: Option<&Volume>| {
            v.is_none_or(|v| grown(v) || failed_for_current_spec(v).is_some())
        })
        .await?;
        let Some(volume) = settled else { return Err(E::Vanished { name }) };
        if grown(&volume) {
            return Ok(volume.status.and_then(|s| s.capacity_bytes).unwrap_or(wanted));
        }
        let why = failed_for_current_spec(&volume).unwrap_or_default();
        let code = node_failure_code(&volume);
        Err(E::NodeFailed { name, node: volume.spec.node, why, code })
    }

    async fn validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, ValidateError> {
        use ValidateError as E;
        if req.volume_id.is_empty() {
            return Err(E::IdMissing);
        }
        if req.volume_capabilities.is_empty() {
            return Err(E::CapabilitiesMissing);
        }
        let volume = volumes::by_volume_id(&self.client, &req.volume_id)
            .await
            .map_err(|source| E::Kube { id: req.volume_id.clone(), source })?
            .ok_or_else(|| E::NotFound(req.volume_id.clone()))?;
        let verdict = check_capabilities(&req, volume.spec.layout());
        Ok(validation_response(req, verdict))
    }

    /// ControllerModifyVolume: the same `modify::request` as plinth's own claim flow, waited for.
    async fn modify(&self, req: &csi::ControllerModifyVolumeRequest) -> Result<(), ModifyVolumeError> {
        if req.volume_id.is_empty() {
            return Err(ModifyVolumeError::IdMissing);
        }
        let changes = MutableParameters::parse(&req.mutable_parameters).map_err(ModifyError::Parameters)?;
        let volume = volumes::by_volume_id(&self.client, &req.volume_id)
            .await
            .map_err(|source| ModifyError::Kube { name: req.volume_id.clone(), source })?
            .ok_or_else(|| ModifyError::VolumeNotFound(req.volume_id.clone()))?;
        if modify::request(&self.client, &volume, changes).await? == Progress::Done {
            return Ok(());
        }
        let name = volume.name_any();
        let acted = |v: Option<&Volume>| v.is_none_or(|v| !matches!(modify::progress(v), Ok(Progress::Pending)));
        let volume = volumes::wait_for(&self.client, &name, self.wait, acted)
            .await
            .map_err(ModifyError::Wait)?
            .ok_or_else(|| ModifyError::VolumeNotFound(req.volume_id.clone()))?;
        modify::progress(&volume)?;
        Ok(())
    }

    fn unimplemented(&self, method: &'static str, why: &str) -> Status {
        let message = format!("{method} is not served by plinth's cluster-mode controller{why}");
        self.rpc.refuse(method, "", Unimplemented(message))
    }
}

#[tonic::async_trait]
impl Controller for ClusterController {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let volume = self.rpc.run("CreateVolume", &req.name, self.create(&req)).await?;
        Ok(Response::new(csi::CreateVolumeResponse { volume: Some(volume) }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        self.rpc.run("DeleteVolume", &id, self.delete(&id)).await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let capacity_bytes = self.rpc.run("ControllerExpandVolume", &req.volume_id, self.expand(&req)).await?;
        Ok(Response::new(csi::ControllerExpandVolumeResponse { capacity_bytes, node_expansion_required: true }))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        Ok(Response::new(self.rpc.run("ValidateVolumeCapabilities", &id, self.validate(req)).await?))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        Ok(Response::new(capabilities_response(&[
            Type::CreateDeleteVolume,
            Type::ExpandVolume,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::GetSnapshot,
            Type::CloneVolume,
            Type::ModifyVolume,
        ])))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(self.unimplemented("ControllerPublishVolume", ": plinth volumes need no attach step"))
    }
    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(self.unimplemented("ControllerUnpublishVolume", ": plinth volumes need no attach step"))
    }
    async fn list_volumes(
        &self,
        _: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        Err(self.unimplemented("ListVolumes", ""))
    }
    async fn get_capacity(
        &self,
        _: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        Err(self.unimplemented("GetCapacity", ": the node agents publish CSIStorageCapacity themselves"))
    }
    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let snapshots = self.snapshots();
        let snapshot = self.rpc.run("CreateSnapshot", &req.source_volume_id, snapshots.create(&req)).await?;
        Ok(Response::new(csi::CreateSnapshotResponse { snapshot: Some(snapshot) }))
    }
    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        let snapshots = self.snapshots();
        self.rpc.run("DeleteSnapshot", &id, snapshots.delete(&id)).await?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }
    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let snapshots = self.snapshots();
        Ok(Response::new(self.rpc.run("ListSnapshots", "", snapshots.list(&req)).await?))
    }
    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        let snapshots = self.snapshots();
        let snapshot = self.rpc.run("GetSnapshot", &id, snapshots.get(&id)).await?;
        Ok(Response::new(csi::GetSnapshotResponse { snapshot: Some(snapshot) }))
    }
    async fn controller_get_volume(
        &self,
        _: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(self.unimplemented("ControllerGetVolume", ""))
    }
    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        self.rpc.run("ControllerModifyVolume", &req.volume_id, self.modify(&req)).await?;
        Ok(Response::new(csi::ControllerModifyVolumeResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use plinth_controller::rpc::status;

    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status { code, message: format!("HTTP {code}"), ..Default::default() }))
    }

    fn create_request(node: Option<&str>) -> csi::CreateVolumeRequest {
        use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
        csi::CreateVolumeRequest {
            name: "pvc-1".into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 10 << 20, limit_bytes: 0 }),
            volume_capabilities: vec![csi::VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume { fs_type: "xfs".into(), ..Default::default() })),
                access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
            }],
            parameters: [("provisioning".to_owned(), "thick".to_owned())].into(),
            accessibility_requirements: node
                .map(|n| csi::TopologyRequirement { requisite: vec![node_topology(n)], preferred: vec![] }),
            ..Default::default()
        }
    }

    #[test]
    fn kubernetes_failures_keep_their_meaning() {
        let create = |source| CreateVolumeError::Kube { name: "pvc-1".into(), source };
        for (code, expected) in [
            (409, Code::Aborted),
            (429, Code::Unavailable),
            (503, Code::Unavailable),
            (403, Code::PermissionDenied),
            (422, Code::Internal),
        ] {
            let status = status(&create(api_error(code)));
            assert_eq!(status.code(), expected, "HTTP {code}");
            assert!(status.message().starts_with("creating volume pvc-1 through the Kubernetes API: "), "{status:?}");
        }
        let timed_out = WaitError::TimedOut { kind: "volume", name: "pvc-1".into(), within: Duration::from_secs(20) };
        assert_eq!(status(&CreateVolumeError::Wait(timed_out)).code(), Code::Aborted, "not final: retry");
        let failed = CreateVolumeError::NodeFailed {
            name: "pvc-1".into(),
            node: "a".into(),
            why: "pool full".into(),
            code: Code::ResourceExhausted,
        };
        assert_eq!(status(&failed).code(), Code::ResourceExhausted);
        assert_eq!(status(&CreateVolumeError::Incompatible { name: "pvc-1".into() }).code(), Code::AlreadyExists);
        let still = DeleteVolumeError::StillThere { name: "pvc-1".into(), why: "staged".into() };
        assert_eq!(status(&still).code(), Code::FailedPrecondition);
    }

    #[test]
    fn create_requests_become_volume_specs() {
        let spec = requested_spec(&create_request(Some("node-b"))).unwrap();
        assert_eq!(spec.node, "node-b");
        assert_eq!(spec.fs_type, Some(FsType::Xfs));
        assert_eq!(spec.provisioning, plinth_engine::model::Provisioning::Thick, "provisioning is kept");
        assert_eq!(spec.size_bytes, 300 << 20, "rounded up to the xfs minimum");
        let no_node = status(&requested_spec(&create_request(None)).unwrap_err());
        assert_eq!(no_node.code(), Code::InvalidArgument);
        let mut bad = create_request(Some("node-b"));
        bad.parameters.insert("color".into(), "blue".into());
        assert_eq!(status(&requested_spec(&bad).unwrap_err()).code(), Code::InvalidArgument);
        let mut copy = create_request(None);
        copy.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
                snapshot_id: "snap-1".into(),
            })),
        });
        let spec = requested_spec(&copy).expect("a copy needs no node: it goes where its source is");
        assert_eq!(spec.content_source, Some(VolumeSource::Snapshot("snap-1".into())));
        copy.volume_content_source = Some(csi::VolumeContentSource { r#type: None });
        assert_eq!(status(&requested_spec(&copy).unwrap_err()).code(), Code::InvalidArgument);
        let elsewhere = CreateVolumeError::SourceElsewhere { id: "snap-1".into(), node: "node-a".into() };
        assert_eq!(status(&elsewhere).code(), Code::ResourceExhausted, "external-provisioner reschedules on it");
    }

    #[test]
    fn only_a_failure_for_the_current_spec_counts() {
        let mut volume = volumes::new_volume("pvc-1", requested_spec(&create_request(Some("a"))).unwrap());
        volume.metadata.generation = Some(2);
        volume.status = Some(crate::crd::VolumeStatus {
            phase: Some(Phase::Failed),
            message: Some("pool has 0 bytes".into()),
            observed_generation: Some(1),
            ..Default::default()
        });
        assert_eq!(failed_for_current_spec(&volume), None, "an older spec's failure is not this one");
        volume.status.as_mut().unwrap().observed_generation = Some(2);
        assert_eq!(failed_for_current_spec(&volume).as_deref(), Some("pool has 0 bytes"));
    }

    #[test]
    fn a_node_failure_answers_the_code_its_node_gave() {
        let mut volume = volumes::new_volume("pvc-1", requested_spec(&create_request(Some("a"))).unwrap());
        volume.status = Some(crate::crd::VolumeStatus { phase: Some(Phase::Failed), ..Default::default() });
        assert_eq!(node_failure_code(&volume), Code::ResourceExhausted, "no reason: an agent before reasons");
        for code in [Code::ResourceExhausted, Code::OutOfRange, Code::InvalidArgument, Code::AlreadyExists] {
            volume.status.as_mut().unwrap().reason = reason::of(code).map(str::to_owned);
            assert_eq!(node_failure_code(&volume), code);
        }
    }
}
