//! CSI GroupController: crash-consistent group snapshots.

use std::sync::Arc;

use plinth_engine::Engine;
use plinth_engine::model::{GroupSnapshotRecord, SnapshotRecord, check_snapshot_parameters};
use plinth_proto::csi_v1::{
    self as csi, group_controller_server::GroupController, group_controller_service_capability,
};
use tonic::{Request, Response, Status};

use crate::controller::to_csi_snapshot;
use crate::rpc::Rpc;

pub struct GroupControllerService {
    engine: Arc<Engine>,
    rpc: Rpc,
}

impl GroupControllerService {
    pub fn new(engine: Arc<Engine>, rpc: Rpc) -> Self {
        Self { engine, rpc }
    }
}

fn to_csi_group(group: &GroupSnapshotRecord, members: &[SnapshotRecord]) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: group.id.to_string(),
        snapshots: members.iter().map(to_csi_snapshot).collect(),
        creation_time: Some(prost_types::Timestamp {
            seconds: group.created_at_seconds,
            nanos: group.created_at_nanos,
        }),
        ready_to_use: true,
    }
}

/// What plinth's GroupController serves, in standalone and cluster mode alike.
pub fn capabilities() -> csi::GroupControllerGetCapabilitiesResponse {
    use group_controller_service_capability::{Rpc, Type, rpc::Type as RpcType};
    csi::GroupControllerGetCapabilitiesResponse {
        capabilities: vec![csi::GroupControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: RpcType::CreateDeleteGetVolumeGroupSnapshot as i32 })),
        }],
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        check_snapshot_parameters(&req.parameters).map_err(|e| self.rpc.refuse("CreateVolumeGroupSnapshot", "", e))?;
        let engine = Arc::clone(&self.engine);
        let (group, members) = self
            .rpc
            .blocking("CreateVolumeGroupSnapshot", "", move || {
                engine.create_group_snapshot(&req.name, &req.source_volume_ids)
            })
            .await?;
        Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(to_csi_group(&group, &members)),
        }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let engine = Arc::clone(&self.engine);
        self.rpc
            .blocking("DeleteVolumeGroupSnapshot", "", move || {
                engine.delete_group_snapshot(&req.group_snapshot_id, &req.snapshot_ids)
            })
            .await?;
        Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let engine = Arc::clone(&self.engine);
        let (group, members) = self
            .rpc
            .blocking("GetVolumeGroupSnapshot", "", move || {
                engine.group_snapshot(&req.group_snapshot_id, &req.snapshot_ids)
            })
            .await?;
        Ok(Response::new(csi::GetVolumeGroupSnapshotResponse { group_snapshot: Some(to_csi_group(&group, &members)) }))
    }
}
