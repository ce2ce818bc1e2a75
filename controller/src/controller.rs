//! CSI Controller over the local pool.

use std::collections::HashMap;
use std::sync::Arc;

use plinth_engine::caps::Capability;
use plinth_engine::model::{
    Layout, PARAM_FS_TYPE, PARAM_PROVISIONING, VolumeParameters, VolumeRecord,
};
use plinth_engine::volumes::CreateVolume;
use plinth_engine::{Engine, Error};
use plinth_proto::TOPOLOGY_NODE_KEY;
use plinth_proto::csi_v1::{
    self as csi, controller_server::Controller, controller_service_capability,
};
use tonic::{Request, Response, Status};

use crate::rpc;

/// Volume context key carrying the CSI name the volume was created with.
pub const CONTEXT_NAME: &str = "plinth.csi.dev/name";

pub struct ControllerService {
    engine: Arc<Engine>,
}

impl ControllerService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

pub fn node_topology(node_id: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), node_id.to_owned())]),
    }
}

/// The volume context handed back to the CO (and to the node on stage).
fn volume_context(record: &VolumeRecord) -> HashMap<String, String> {
    let mut context = HashMap::from([
        (
            PARAM_PROVISIONING.to_owned(),
            record.provisioning.as_str().to_owned(),
        ),
        (CONTEXT_NAME.to_owned(), record.name.clone()),
    ]);
    if let Layout::Filesystem { fs_type } = record.layout {
        context.insert(PARAM_FS_TYPE.to_owned(), fs_type.as_str().to_owned());
    }
    context
}

fn to_csi_volume(record: &VolumeRecord, node_id: &str) -> csi::Volume {
    csi::Volume {
        capacity_bytes: record.capacity_bytes as i64,
        volume_id: record.id.to_string(),
        volume_context: volume_context(record),
        content_source: None,
        accessible_topology: vec![node_topology(node_id)],
    }
}

/// Nodes named by a topology list, or `None` when the list says nothing about nodes.
fn named_nodes(topologies: &[csi::Topology]) -> Option<Vec<String>> {
    let nodes: Vec<String> = topologies
        .iter()
        .filter_map(|t| t.segments.get(TOPOLOGY_NODE_KEY).cloned())
        .collect();
    (!topologies.is_empty()).then_some(nodes)
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not supported by plinth yet"))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        const METHOD: &str = "CreateVolume";
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(rpc::invalid(METHOD, "name is required"));
        }
        let capabilities =
            Capability::parse_all(&req.volume_capabilities).map_err(|e| rpc::refused(METHOD, e))?;
        let parameters =
            VolumeParameters::parse(&req.parameters).map_err(|e| rpc::refused(METHOD, e))?;
        if req.volume_content_source.is_some() {
            return Err(rpc::invalid(
                METHOD,
                "volume_content_source (snapshots, clones) is not supported yet",
            ));
        }
        let capacity = req.capacity_range.unwrap_or_default();
        let request = CreateVolume {
            name: req.name.clone(),
            required_bytes: capacity.required_bytes,
            limit_bytes: capacity.limit_bytes,
            capabilities,
            parameters,
            requisite_nodes: req
                .accessibility_requirements
                .as_ref()
                .and_then(|r| named_nodes(&r.requisite)),
        };
        let engine = Arc::clone(&self.engine);
        let record = rpc::run(METHOD, &req.name, move || engine.create_volume(&request)).await?;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(to_csi_volume(&record, self.engine.node_id())),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        let engine = Arc::clone(&self.engine);
        let volume_id = id.clone();
        rpc::run("DeleteVolume", &id, move || {
            engine.delete_volume(&volume_id)
        })
        .await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "plinth volumes need no controller publish (attachRequired: false)",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "plinth volumes need no controller unpublish (attachRequired: false)",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        const METHOD: &str = "ValidateVolumeCapabilities";
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(rpc::invalid(METHOD, "volume_id is required"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(rpc::invalid(METHOD, "volume_capabilities is required"));
        }
        let engine = Arc::clone(&self.engine);
        let id = req.volume_id.clone();
        let record = rpc::run(METHOD, &req.volume_id, move || {
            engine
                .volume(&id)?
                .ok_or_else(|| Error::NotFound(format!("volume {id:?} does not exist")))
        })
        .await?;
        let verdict = (|| -> plinth_engine::Result<()> {
            let params = VolumeParameters::parse(&req.parameters)?;
            if params.fs_type.is_some() && params.fs_type != record.layout.fs_type() {
                return Err(Error::InvalidArgument(
                    "parameter fsType does not match the volume".into(),
                ));
            }
            for cap in Capability::parse_all(&req.volume_capabilities)? {
                cap.check_layout(record.layout)?;
            }
            Ok(())
        })();
        let response = match verdict {
            Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(err) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: err.to_string(),
            },
        };
        Ok(Response::new(response))
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let engine = Arc::clone(&self.engine);
        let (records, next_token) = rpc::run("ListVolumes", "", move || {
            engine.list_volumes(&req.starting_token, req.max_entries)
        })
        .await?;
        let node = self.engine.node_id();
        let entries = records
            .iter()
            .map(|r| csi::list_volumes_response::Entry {
                volume: Some(to_csi_volume(r, node)),
                status: None,
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let parameters =
            VolumeParameters::parse(&req.parameters).map_err(|e| rpc::refused("GetCapacity", e))?;
        let for_node = req
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(TOPOLOGY_NODE_KEY).cloned());
        let engine = Arc::clone(&self.engine);
        let capacity = rpc::run("GetCapacity", "", move || {
            engine.capacity(for_node.as_deref())
        })
        .await?;
        let minimum = parameters
            .fs_type
            .map_or(plinth_engine::size::MIB, |fs| fs.minimum_bytes());
        let available = capacity.available_bytes.min(i64::MAX as u64) as i64;
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(available),
            minimum_volume_size: Some(minimum as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        let capabilities = [
            Type::CreateDeleteVolume,
            Type::ListVolumes,
            Type::GetCapacity,
        ]
        .into_iter()
        .map(|t| csi::ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(
                controller_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        _: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        Err(unimplemented("CreateSnapshot"))
    }

    async fn delete_snapshot(
        &self,
        _: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        Err(unimplemented("DeleteSnapshot"))
    }

    async fn list_snapshots(
        &self,
        _: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Err(unimplemented("ListSnapshots"))
    }

    async fn get_snapshot(
        &self,
        _: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        Err(unimplemented("GetSnapshot"))
    }

    async fn controller_expand_volume(
        &self,
        _: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        Err(unimplemented("ControllerExpandVolume"))
    }

    async fn controller_get_volume(
        &self,
        _: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(unimplemented("ControllerGetVolume"))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(unimplemented("ControllerModifyVolume"))
    }
}
