//! CSI Controller over the local pool.

use std::sync::Arc;

use plinth_engine::caps::Capability;
use plinth_engine::model::{
    ContentSource, Layout, MutableParameters, SnapshotRecord, VolumeRecord, check_snapshot_parameters,
};
use plinth_engine::volumes::{CreateVolume, SourceRequest};
use plinth_engine::{Engine, Error};
use plinth_proto::csi_v1::{self as csi, controller_server::Controller, controller_service_capability};
use tonic::{Request, Response, Status};

pub use crate::context::CONTEXT_NAME;
use crate::context::VolumeContext;
use crate::params::ClassParameters;
use crate::rpc::{Rpc, Unimplemented};
pub use crate::topology::node_topology;
use crate::topology::{named_nodes, node_of};

pub struct ControllerService {
    engine: Arc<Engine>,
    rpc: Rpc,
}

impl ControllerService {
    pub fn new(engine: Arc<Engine>, rpc: Rpc) -> Self {
        Self { engine, rpc }
    }
}

fn no_attach() -> Unimplemented {
    Unimplemented("plinth volumes need no controller publish or unpublish (attachRequired: false)".into())
}

fn to_csi_volume(record: &VolumeRecord, node_id: &str) -> csi::Volume {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let content_source = record.content_source.as_ref().map(|source| csi::VolumeContentSource {
        r#type: Some(match source {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource { snapshot_id: id.to_string() }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource { volume_id: id.to_string() }),
        }),
    });
    csi::Volume {
        capacity_bytes: record.capacity_bytes as i64,
        volume_id: record.id.to_string(),
        volume_context: VolumeContext::for_record(record).to_map(),
        content_source,
        accessible_topology: vec![node_topology(node_id)],
    }
}

pub fn to_csi_snapshot(record: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: record.size_bytes as i64,
        snapshot_id: record.id.to_string(),
        source_volume_id: record.source_volume_id.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: record.created_at_seconds,
            nanos: record.created_at_nanos,
        }),
        ready_to_use: true,
        group_snapshot_id: record.group_snapshot_id.as_ref().map(ToString::to_string).unwrap_or_default(),
    }
}

fn condition(message: Option<String>) -> csi::VolumeCondition {
    csi::VolumeCondition { abnormal: message.is_some(), message: message.unwrap_or_default() }
}

/// Whether a volume of `layout` serves what a ValidateVolumeCapabilities request asks: its
/// parameters, mutable parameters and capabilities. The same check for every path.
pub fn check_capabilities(req: &csi::ValidateVolumeCapabilitiesRequest, layout: Layout) -> plinth_engine::Result<()> {
    let params = ClassParameters::parse(&req.parameters)?;
    if params.fs_type.is_some() && params.fs_type != layout.fs_type() {
        return Err(Error::InvalidArgument("parameter fsType does not match the volume".into()));
    }
    MutableParameters::parse(&req.mutable_parameters)?;
    for cap in Capability::parse_all(&req.volume_capabilities)? {
        cap.check_layout(layout)?;
    }
    Ok(())
}

/// ValidateVolumeCapabilities' answer: the request echoed as confirmed, or why not.
pub fn validation_response(
    req: csi::ValidateVolumeCapabilitiesRequest,
    verdict: plinth_engine::Result<()>,
) -> csi::ValidateVolumeCapabilitiesResponse {
    match verdict {
        Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        },
        Err(err) => csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message: err.to_string() },
    }
}

/// ControllerGetCapabilities' answer for these RPC capabilities.
pub fn capabilities_response(
    types: &[controller_service_capability::rpc::Type],
) -> csi::ControllerGetCapabilitiesResponse {
    let capabilities = types
        .iter()
        .map(|t| csi::ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc {
                r#type: *t as i32,
            })),
        })
        .collect();
    csi::ControllerGetCapabilitiesResponse { capabilities }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        const METHOD: &str = "CreateVolume";
        let req = request.into_inner();
        let rpc = &self.rpc;
        if req.name.is_empty() {
            return Err(rpc.invalid(METHOD, "", "name is required"));
        }
        let refuse = |e| rpc.refuse(METHOD, &req.name, e);
        let capabilities = Capability::parse_all(&req.volume_capabilities).map_err(refuse)?;
        let parameters = ClassParameters::parse(&req.parameters).map_err(refuse)?.volume_parameters();
        let mutable_parameters = MutableParameters::parse(&req.mutable_parameters).map_err(refuse)?;
        use csi::volume_content_source::Type;
        let content_source = match req.volume_content_source.as_ref().map(|s| s.r#type.as_ref()) {
            None => None,
            Some(Some(Type::Snapshot(s))) => Some(SourceRequest::Snapshot(s.snapshot_id.clone())),
            Some(Some(Type::Volume(v))) => Some(SourceRequest::Volume(v.volume_id.clone())),
            Some(None) => {
                return Err(rpc.invalid(
                    METHOD,
                    &req.name,
                    "volume_content_source names neither a snapshot nor a volume",
                ));
            }
        };
        let capacity = req.capacity_range.unwrap_or_default();
        let request = CreateVolume {
            name: req.name.clone(),
            required_bytes: capacity.required_bytes,
            limit_bytes: capacity.limit_bytes,
            capabilities,
            parameters,
            requisite_nodes: req.accessibility_requirements.as_ref().and_then(|r| named_nodes(&r.requisite)),
            content_source,
            mutable_parameters,
        };
        let engine = Arc::clone(&self.engine);
        let record = rpc.blocking(METHOD, &req.name, move || engine.create_volume(&request)).await?;
        Ok(Response::new(csi::CreateVolumeResponse { volume: Some(to_csi_volume(&record, self.engine.node_id())) }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        let engine = Arc::clone(&self.engine);
        let volume_id = id.clone();
        self.rpc.blocking("DeleteVolume", &id, move || engine.delete_volume(&volume_id)).await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(self.rpc.refuse("ControllerPublishVolume", "", no_attach()))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(self.rpc.refuse("ControllerUnpublishVolume", "", no_attach()))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        const METHOD: &str = "ValidateVolumeCapabilities";
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(self.rpc.invalid(METHOD, "", "volume_id is required"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(self.rpc.invalid(METHOD, &req.volume_id, "volume_capabilities is required"));
        }
        let engine = Arc::clone(&self.engine);
        let id = req.volume_id.clone();
        let record = self
            .rpc
            .blocking(METHOD, &req.volume_id, move || {
                engine.volume(&id)?.ok_or_else(|| Error::NotFound(format!("volume {id:?} does not exist")))
            })
            .await?;
        let verdict = check_capabilities(&req, record.layout);
        Ok(Response::new(validation_response(req, verdict)))
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let engine = Arc::clone(&self.engine);
        let entries = self
            .rpc
            .blocking("ListVolumes", "", move || {
                let (records, next_token) = engine.list_volumes(&req.starting_token, req.max_entries)?;
                let conditions = engine.volume_conditions(&records)?;
                let mut entries = Vec::with_capacity(records.len());
                for (record, message) in records.iter().zip(conditions) {
                    let status = csi::list_volumes_response::VolumeStatus {
                        published_node_ids: Vec::new(),
                        volume_condition: Some(condition(message)),
                    };
                    entries.push(csi::list_volumes_response::Entry {
                        volume: Some(to_csi_volume(record, engine.node_id())),
                        status: Some(status),
                    });
                }
                Ok::<_, Error>(csi::ListVolumesResponse { entries, next_token })
            })
            .await?;
        Ok(Response::new(entries))
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let parameters = ClassParameters::parse(&req.parameters).map_err(|e| self.rpc.refuse("GetCapacity", "", e))?;
        let for_node = req.accessible_topology.as_ref().and_then(node_of).map(str::to_owned);
        let engine = Arc::clone(&self.engine);
        let capacity = self.rpc.blocking("GetCapacity", "", move || engine.capacity(for_node.as_deref())).await?;
        let minimum = parameters.fs_type.map_or(plinth_engine::size::MIB, |fs| fs.minimum_bytes());
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
        Ok(Response::new(capabilities_response(&[
            Type::CreateDeleteVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::GetSnapshot,
            Type::CloneVolume,
            Type::ExpandVolume,
            Type::VolumeCondition,
            Type::GetVolume,
            Type::SingleNodeMultiWriter,
            Type::ModifyVolume,
        ])))
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        check_snapshot_parameters(&req.parameters)
            .map_err(|e| self.rpc.refuse("CreateSnapshot", &req.source_volume_id, e))?;
        let engine = Arc::clone(&self.engine);
        let (name, source) = (req.name.clone(), req.source_volume_id.clone());
        let record = self
            .rpc
            .blocking("CreateSnapshot", &req.source_volume_id, move || engine.create_snapshot(&name, &source))
            .await?;
        Ok(Response::new(csi::CreateSnapshotResponse { snapshot: Some(to_csi_snapshot(&record)) }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        let engine = Arc::clone(&self.engine);
        let snapshot_id = id.clone();
        self.rpc.blocking("DeleteSnapshot", &id, move || engine.delete_snapshot(&snapshot_id)).await?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let engine = Arc::clone(&self.engine);
        let (records, next_token) = self
            .rpc
            .blocking("ListSnapshots", "", move || {
                engine.list_snapshots(&req.starting_token, req.max_entries, &req.snapshot_id, &req.source_volume_id)
            })
            .await?;
        let entries = records
            .iter()
            .map(|r| csi::list_snapshots_response::Entry { snapshot: Some(to_csi_snapshot(r)) })
            .collect();
        Ok(Response::new(csi::ListSnapshotsResponse { entries, next_token }))
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        let engine = Arc::clone(&self.engine);
        let snapshot_id = id.clone();
        let record = self.rpc.blocking("GetSnapshot", &id, move || engine.snapshot(&snapshot_id)).await?;
        Ok(Response::new(csi::GetSnapshotResponse { snapshot: Some(to_csi_snapshot(&record)) }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        const METHOD: &str = "ControllerExpandVolume";
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(self.rpc.invalid(METHOD, "", "volume_id is required"));
        }
        let range =
            req.capacity_range.ok_or_else(|| self.rpc.invalid(METHOD, &req.volume_id, "capacity_range is required"))?;
        let engine = Arc::clone(&self.engine);
        let id = req.volume_id.clone();
        let (capacity, node_expansion_required) = self
            .rpc
            .blocking(METHOD, &req.volume_id, move || {
                engine.expand_volume(&id, range.required_bytes, range.limit_bytes)
            })
            .await?;
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: capacity as i64,
            node_expansion_required,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        const METHOD: &str = "ControllerGetVolume";
        let id = request.into_inner().volume_id;
        if id.is_empty() {
            return Err(self.rpc.invalid(METHOD, "", "volume_id is required"));
        }
        let engine = Arc::clone(&self.engine);
        let volume_id = id.clone();
        let response = self
            .rpc
            .blocking(METHOD, &id, move || {
                let record = engine
                    .volume(&volume_id)?
                    .ok_or_else(|| Error::NotFound(format!("volume {volume_id:?} does not exist")))?;
                let published_node_ids =
                    if record.staged.is_some() { vec![engine.node_id().to_owned()] } else { Vec::new() };
                Ok::<_, Error>(csi::ControllerGetVolumeResponse {
                    volume: Some(to_csi_volume(&record, engine.node_id())),
                    status: Some(csi::controller_get_volume_response::VolumeStatus {
                        published_node_ids,
                        volume_condition: Some(condition(engine.volume_condition(&record)?)),
                    }),
                })
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        const METHOD: &str = "ControllerModifyVolume";
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(self.rpc.invalid(METHOD, "", "volume_id is required"));
        }
        let changes = MutableParameters::parse(&req.mutable_parameters)
            .map_err(|e| self.rpc.refuse(METHOD, &req.volume_id, e))?;
        let engine = Arc::clone(&self.engine);
        let id = req.volume_id.clone();
        self.rpc.blocking(METHOD, &req.volume_id, move || engine.modify_volume(&id, changes)).await?;
        Ok(Response::new(csi::ControllerModifyVolumeResponse {}))
    }
}
