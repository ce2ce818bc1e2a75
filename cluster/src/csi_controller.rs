//! The CSI Controller service in cluster mode, for the standard external-provisioner and
//! external-resizer sidecars. It drives the same `Volume` objects through the same helpers
//! (`crate::volumes`) as plinth's own claim reconciler, so the node agents do the disk work
//! either way.
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
use plinth_controller::topology::{node_topology, requested_node};
use plinth_engine::caps::{AccessType, Capability};
use plinth_engine::model::FsType;
use plinth_engine::size::{GIB, MIB, resolve_capacity};
use plinth_proto::TOPOLOGY_NODE_KEY;
use plinth_proto::csi_v1::{self as csi, controller_server::Controller, controller_service_capability};
use tonic::{Code, Request, Response, Status};

use crate::crd::{Phase, Volume, VolumeMode, VolumeSpec};
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
    #[error("snapshots and clones are not provisioned through cluster mode yet")]
    ContentSource,
    #[error("no {TOPOLOGY_NODE_KEY} in accessibility_requirements: run external-provisioner with topology enabled")]
    NoNode,
    #[error(transparent)]
    Request(plinth_engine::Error),
    #[error("volume {name} exists with a different node, mode or size")]
    Incompatible { name: String },
    #[error("node {node} could not create volume {name}: {why}")]
    NodeFailed { name: String, node: String, why: String },
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
            Self::NameMissing | Self::ContentSource | Self::NoNode => Code::InvalidArgument,
            Self::Request(e) => e.code(),
            Self::Incompatible { .. } => Code::AlreadyExists,
            Self::NodeFailed { .. } => Code::ResourceExhausted,
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
    NodeFailed { name: String, node: String, why: String },
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
            Self::NodeFailed { .. } => Code::ResourceExhausted,
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

fn phase(volume: &Volume) -> Option<Phase> {
    volume.status.as_ref().and_then(|s| s.phase)
}

/// The agent has acted on the Volume's current spec (not an older one) and reported Failed.
fn failed_for_current_spec(volume: &Volume) -> Option<String> {
    let status = volume.status.as_ref()?;
    let current = status.observed_generation.is_some() && status.observed_generation == volume.metadata.generation;
    (status.phase == Some(Phase::Failed) && current)
        .then(|| status.message.clone().unwrap_or_else(|| "the node could not do it".into()))
}

fn to_csi(volume: &Volume) -> csi::Volume {
    let status = volume.status.clone().unwrap_or_default();
    csi::Volume {
        capacity_bytes: status.capacity_bytes.unwrap_or(volume.spec.size_bytes),
        volume_id: status.volume_id.unwrap_or_default(),
        volume_context: volume.volume_context().to_map(),
        content_source: None,
        accessible_topology: vec![node_topology(&volume.spec.node)],
    }
}

/// What a CreateVolume asks for, as a `Volume` spec.
fn requested_spec(req: &csi::CreateVolumeRequest) -> Result<VolumeSpec, CreateVolumeError> {
    use CreateVolumeError as E;
    if req.volume_content_source.is_some() {
        return Err(E::ContentSource);
    }
    let capabilities = Capability::parse_all(&req.volume_capabilities).map_err(E::Request)?;
    let parameters = ClassParameters::parse(&req.parameters).map_err(E::Request)?;
    let mount_fs = capabilities.iter().find_map(|c| match &c.access_type {
        AccessType::Mount { fs_type, .. } => Some(fs_type.or(parameters.fs_type).unwrap_or(FsType::Ext4)),
        AccessType::Block => None,
    });
    let node = requested_node(req.accessibility_requirements.as_ref()).ok_or(E::NoNode)?;
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
    })
}

impl ClusterController {
    async fn create(&self, req: &csi::CreateVolumeRequest) -> Result<csi::Volume, CreateVolumeError> {
        use CreateVolumeError as E;
        if req.name.is_empty() {
            return Err(E::NameMissing);
        }
        let name = req.name.clone();
        let spec = requested_spec(req)?;
        let kube = |source| E::Kube { name: name.clone(), source };
        let (existing, _) = volumes::ensure(&self.client, &name, spec.clone()).await.map_err(kube)?;
        if existing.spec.node != spec.node
            || existing.spec.volume_mode != spec.volume_mode
            || existing.spec.size_bytes < spec.size_bytes
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
        let why = volume.status.and_then(|s| s.message).unwrap_or_else(|| "the node could not create it".into());
        Err(E::NodeFailed { name, node: volume.spec.node, why })
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
        Err(E::NodeFailed { name, node: volume.spec.node, why })
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
        Ok(Response::new(capabilities_response(&[Type::CreateDeleteVolume, Type::ExpandVolume])))
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
        _: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        Err(self.unimplemented("CreateSnapshot", ""))
    }
    async fn delete_snapshot(
        &self,
        _: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        Err(self.unimplemented("DeleteSnapshot", ""))
    }
    async fn list_snapshots(
        &self,
        _: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Err(self.unimplemented("ListSnapshots", ""))
    }
    async fn get_snapshot(
        &self,
        _: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        Err(self.unimplemented("GetSnapshot", ""))
    }
    async fn controller_get_volume(
        &self,
        _: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(self.unimplemented("ControllerGetVolume", ""))
    }
    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(self.unimplemented("ControllerModifyVolume", ""))
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
        let timed_out = WaitError::TimedOut { name: "pvc-1".into(), within: Duration::from_secs(20) };
        assert_eq!(status(&CreateVolumeError::Wait(timed_out)).code(), Code::Aborted, "not final: retry");
        let failed = CreateVolumeError::NodeFailed { name: "pvc-1".into(), node: "a".into(), why: "pool full".into() };
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
}
