//! The CSI Controller service in cluster mode, for the standard external-provisioner and
//! external-resizer sidecars. It drives the same `Volume` objects through the same functions as
//! plinth's own claim reconciler (`provisioner::ensure_volume`, `request_growth`), so both paths
//! share one implementation: the node agent does the disk work either way.

use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use plinth_controller::controller::validation_response;
use plinth_engine::caps::{AccessType, Capability};
use plinth_engine::model::{FsType, VolumeParameters};
use plinth_engine::size::{GIB, MIB, resolve_capacity};
use plinth_proto::TOPOLOGY_NODE_KEY;
use plinth_proto::csi_v1::{self as csi, controller_server::Controller, controller_service_capability};
use tonic::{Request, Response, Status};

use crate::crd::{Phase, Volume, VolumeMode, VolumeSpec};
use crate::provisioner::{ensure_volume, request_growth};

/// How long one RPC waits for the node agent before asking the sidecar to retry (it will, with
/// the same name: idempotent).
const WAIT: Duration = Duration::from_secs(20);

pub struct ClusterController {
    client: kube::Client,
}

impl ClusterController {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    fn volumes(&self) -> Api<Volume> {
        Api::all(self.client.clone())
    }

    async fn by_volume_id(&self, volume_id: &str) -> Result<Option<Volume>, Status> {
        let list = self.volumes().list(&ListParams::default()).await.map_err(kube_status)?;
        Ok(list.items.into_iter().find(|v| v.status.as_ref().and_then(|s| s.volume_id.as_deref()) == Some(volume_id)))
    }

    /// Polls the Volume until `done` says so, or WAIT passes (then ABORTED: retry later).
    async fn wait_for(&self, name: &str, done: impl Fn(&Volume) -> Result<bool, Status>) -> Result<Volume, Status> {
        let deadline = Instant::now() + WAIT;
        loop {
            let volume = self.volumes().get(name).await.map_err(kube_status)?;
            if done(&volume)? {
                return Ok(volume);
            }
            if Instant::now() > deadline {
                return Err(Status::aborted(format!("volume {name} is still being prepared on its node; retry")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn kube_status(error: kube::Error) -> Status {
    Status::unavailable(format!("Kubernetes API: {error}"))
}

fn refused(error: plinth_engine::Error) -> Status {
    Status::from(error)
}

/// The node a CreateVolume must land on: plinth volumes live on one node, named by topology.
fn requested_node(request: &csi::CreateVolumeRequest) -> Option<String> {
    let requirement = request.accessibility_requirements.as_ref()?;
    requirement.preferred.iter().chain(&requirement.requisite).find_map(|t| t.segments.get(TOPOLOGY_NODE_KEY).cloned())
}

fn to_csi(volume: &Volume) -> csi::Volume {
    let status = volume.status.clone().unwrap_or_default();
    let mut context = std::collections::HashMap::from([("plinth.csi.dev/name".to_owned(), volume.name_any())]);
    if let Some(fs) = &volume.spec.fs_type {
        context.insert("fsType".into(), fs.clone());
    }
    csi::Volume {
        capacity_bytes: status.capacity_bytes.unwrap_or(volume.spec.size_bytes),
        volume_id: status.volume_id.unwrap_or_default(),
        volume_context: context,
        content_source: None,
        accessible_topology: vec![csi::Topology {
            segments: [(TOPOLOGY_NODE_KEY.to_owned(), volume.spec.node.clone())].into(),
        }],
    }
}

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!("{what} is served by plinth's node-local controller, not in cluster mode")))
}

#[tonic::async_trait]
impl Controller for ClusterController {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        if req.volume_content_source.is_some() {
            return Err(Status::invalid_argument("snapshots and clones are not provisioned through cluster mode yet"));
        }
        let capabilities = Capability::parse_all(&req.volume_capabilities).map_err(refused)?;
        let parameters = VolumeParameters::parse(&req.parameters).map_err(refused)?;
        let mount_fs = capabilities.iter().find_map(|c| match &c.access_type {
            AccessType::Mount { fs_type, .. } => Some(fs_type.or(parameters.fs_type).unwrap_or(FsType::Ext4)),
            AccessType::Block => None,
        });
        let node = requested_node(&req).ok_or_else(|| {
            Status::invalid_argument(format!(
                "no {TOPOLOGY_NODE_KEY} in accessibility_requirements: run external-provisioner with topology enabled"
            ))
        })?;
        let range = req.capacity_range.unwrap_or_default();
        let minimum = mount_fs.map_or(MIB, FsType::minimum_bytes);
        let size = resolve_capacity(range.required_bytes, range.limit_bytes, GIB, minimum).map_err(refused)?;
        let spec = VolumeSpec {
            node,
            size_bytes: size as i64,
            volume_mode: if mount_fs.is_some() { VolumeMode::Filesystem } else { VolumeMode::Block },
            fs_type: mount_fs.map(|fs| fs.as_str().to_owned()),
            provisioning: Some(parameters.provisioning.as_str().to_owned()),
            mkfs_options: parameters.mkfs_options.clone(),
            claim_ref: None,
        };
        let (existing, _) = ensure_volume(&self.client, &req.name, spec.clone())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if existing.spec.node != spec.node
            || existing.spec.volume_mode != spec.volume_mode
            || existing.spec.size_bytes < spec.size_bytes
        {
            return Err(Status::already_exists(format!(
                "volume {} exists with a different node, mode or size",
                req.name
            )));
        }
        let volume = self
            .wait_for(&req.name, |v| match v.status.as_ref().and_then(|s| s.phase) {
                Some(Phase::Ready) => Ok(true),
                Some(Phase::Failed) => Err(Status::resource_exhausted(
                    v.status
                        .as_ref()
                        .and_then(|s| s.message.clone())
                        .unwrap_or_else(|| "the node could not create it".into()),
                )),
                _ => Ok(false),
            })
            .await;
        if let Err(status) = &volume
            && status.code() == tonic::Code::ResourceExhausted
        {
            // Leave nothing behind: the agent drops its finalizer once there is no image.
            let _ = self.volumes().delete(&req.name, &DeleteParams::default()).await;
        }
        Ok(Response::new(csi::CreateVolumeResponse { volume: Some(to_csi(&volume?)) }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let Some(volume) = self.by_volume_id(&id).await? else {
            return Ok(Response::new(csi::DeleteVolumeResponse {}));
        };
        let name = volume.name_any();
        match self.volumes().delete(&name, &DeleteParams::default()).await {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(kube_status(e)),
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.volumes().get_opt(&name).await.map_err(kube_status)? {
                None => return Ok(Response::new(csi::DeleteVolumeResponse {})),
                Some(v) if Instant::now() > deadline => {
                    let why =
                        v.status.and_then(|s| s.message).unwrap_or_else(|| "the node has not removed it yet".into());
                    return Err(Status::failed_precondition(why));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let range = req.capacity_range.ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let volume = self.by_volume_id(&req.volume_id).await?.ok_or_else(|| Status::not_found("no such volume"))?;
        let name = volume.name_any();
        let wanted = resolve_capacity(range.required_bytes, range.limit_bytes, 0, MIB).map_err(refused)? as i64;
        if wanted > volume.spec.size_bytes {
            request_growth(&self.client, &name, wanted).await.map_err(|e| Status::unavailable(e.to_string()))?;
        }
        let grown = self
            .wait_for(&name, |v| Ok(v.status.as_ref().and_then(|s| s.capacity_bytes).unwrap_or(0) >= wanted))
            .await?;
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: grown.status.and_then(|s| s.capacity_bytes).unwrap_or(wanted),
            node_expansion_required: true,
        }))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let volume = self.by_volume_id(&req.volume_id).await?.ok_or_else(|| Status::not_found("no such volume"))?;
        let block = volume.spec.volume_mode == VolumeMode::Block;
        let verdict = Capability::parse_all(&req.volume_capabilities).and_then(|caps| {
            if block && caps.iter().any(|c| matches!(c.access_type, AccessType::Mount { .. })) {
                return Err(plinth_engine::Error::InvalidArgument("a block volume cannot be mounted".into()));
            }
            Ok(())
        });
        Ok(Response::new(validation_response(req, verdict)))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        let capabilities = [Type::CreateDeleteVolume, Type::ExpandVolume]
            .into_iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc {
                    r#type: t as i32,
                })),
            })
            .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        unimplemented("ControllerPublishVolume")
    }
    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        unimplemented("ControllerUnpublishVolume")
    }
    async fn list_volumes(
        &self,
        _: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        unimplemented("ListVolumes")
    }
    async fn get_capacity(
        &self,
        _: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        unimplemented("GetCapacity (the node agents publish CSIStorageCapacity themselves)")
    }
    async fn create_snapshot(
        &self,
        _: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        unimplemented("CreateSnapshot")
    }
    async fn delete_snapshot(
        &self,
        _: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        unimplemented("DeleteSnapshot")
    }
    async fn list_snapshots(
        &self,
        _: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        unimplemented("ListSnapshots")
    }
    async fn get_snapshot(
        &self,
        _: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        unimplemented("GetSnapshot")
    }
    async fn controller_get_volume(
        &self,
        _: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        unimplemented("ControllerGetVolume")
    }
    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        unimplemented("ControllerModifyVolume")
    }
}
