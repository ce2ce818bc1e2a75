//! CSI Node service: turns stage/publish requests into engine operations; and the node's local
//! API (`plinth.v1.Local`) for the CLI.

mod local;

pub use local::LocalService;

use std::sync::Arc;

use plinth_controller::controller::node_topology;
use plinth_controller::rpc::Rpc;
use plinth_engine::caps::Capability;
use plinth_engine::node::VolumeStats;
use plinth_engine::{Engine, Error, VolumeId};
use plinth_proto::csi_v1::{self as csi, node_server::Node, node_service_capability, volume_usage};
use tonic::{Request, Response, Status};

pub struct NodeService {
    engine: Arc<Engine>,
    rpc: Rpc,
    max_volumes_per_node: i64,
}

impl NodeService {
    pub fn new(engine: Arc<Engine>, rpc: Rpc, max_volumes_per_node: i64) -> Self {
        Self { engine, rpc, max_volumes_per_node }
    }

    /// The request's volume: required, and an ID this node never issued is NOT_FOUND.
    /// Parses the ID (a malformed one names no volume here: NOT_FOUND). Handlers call it after
    /// checking the other fields, so a request missing one is INVALID_ARGUMENT whatever its ID, as
    /// csi-sanity checks with IDs of its own shape.
    fn volume_id(&self, method: &'static str, raw: &str) -> Result<VolumeId, Status> {
        self.required(method, raw, "volume_id", raw)?;
        VolumeId::parse(raw).ok_or_else(|| {
            let node = self.engine.node_id();
            self.rpc.refuse(method, raw, Error::NotFound(format!("volume {raw:?} does not exist on node {node}")))
        })
    }

    fn required(&self, method: &'static str, volume_id: &str, what: &str, value: &str) -> Result<(), Status> {
        if value.is_empty() {
            return Err(self.rpc.invalid(method, volume_id, format!("{what} is required")));
        }
        Ok(())
    }

    fn capability(
        &self,
        method: &'static str,
        volume_id: &str,
        cap: Option<&csi::VolumeCapability>,
    ) -> Result<Capability, Status> {
        let cap = cap.ok_or_else(|| self.rpc.invalid(method, volume_id, "volume_capability is required"))?;
        Capability::parse(cap).map_err(|e| self.rpc.refuse(method, volume_id, e))
    }
}

fn usage(unit: volume_usage::Unit, total: u64, available: u64, used: u64) -> csi::VolumeUsage {
    let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
    csi::VolumeUsage { available: clamp(available), total: clamp(total), used: clamp(used), unit: unit as i32 }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        const METHOD: &str = "NodeStageVolume";
        let req = request.into_inner();
        self.required(METHOD, &req.volume_id, "volume_id", &req.volume_id)?;
        self.required(METHOD, &req.volume_id, "staging_target_path", &req.staging_target_path)?;
        let cap = self.capability(METHOD, &req.volume_id, req.volume_capability.as_ref())?;
        let id = self.volume_id(METHOD, &req.volume_id)?;
        let engine = Arc::clone(&self.engine);
        let staging = req.staging_target_path;
        self.rpc.blocking(METHOD, &req.volume_id, move || engine.stage_volume(&id, &staging, &cap)).await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        const METHOD: &str = "NodeUnstageVolume";
        let req = request.into_inner();
        self.required(METHOD, &req.volume_id, "volume_id", &req.volume_id)?;
        self.required(METHOD, &req.volume_id, "staging_target_path", &req.staging_target_path)?;
        let id = self.volume_id(METHOD, &req.volume_id)?;
        let engine = Arc::clone(&self.engine);
        let staging = req.staging_target_path;
        self.rpc.blocking(METHOD, &req.volume_id, move || engine.unstage_volume(&id, &staging)).await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        const METHOD: &str = "NodePublishVolume";
        let req = request.into_inner();
        self.required(METHOD, &req.volume_id, "volume_id", &req.volume_id)?;
        self.required(METHOD, &req.volume_id, "target_path", &req.target_path)?;
        let cap = self.capability(METHOD, &req.volume_id, req.volume_capability.as_ref())?;
        self.required(METHOD, &req.volume_id, "staging_target_path", &req.staging_target_path)?;
        let id = self.volume_id(METHOD, &req.volume_id)?;
        let engine = Arc::clone(&self.engine);
        let (staging, target, readonly) = (req.staging_target_path, req.target_path, req.readonly);
        self.rpc
            .blocking(METHOD, &req.volume_id, move || engine.publish_volume(&id, &staging, &target, &cap, readonly))
            .await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        const METHOD: &str = "NodeUnpublishVolume";
        let req = request.into_inner();
        self.required(METHOD, &req.volume_id, "volume_id", &req.volume_id)?;
        self.required(METHOD, &req.volume_id, "target_path", &req.target_path)?;
        let id = self.volume_id(METHOD, &req.volume_id)?;
        let engine = Arc::clone(&self.engine);
        let target = req.target_path;
        self.rpc.blocking(METHOD, &req.volume_id, move || engine.unpublish_volume(&id, &target)).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        const METHOD: &str = "NodeGetVolumeStats";
        let req = request.into_inner();
        self.required(METHOD, &req.volume_id, "volume_id", &req.volume_id)?;
        self.required(METHOD, &req.volume_id, "volume_path", &req.volume_path)?;
        let id = self.volume_id(METHOD, &req.volume_id)?;
        let engine = Arc::clone(&self.engine);
        let path = req.volume_path;
        let (stats, condition) =
            self.rpc.blocking(METHOD, &req.volume_id, move || engine.volume_stats(&id, &path)).await?;
        let usage = match stats {
            VolumeStats::Filesystem(fs) => vec![
                usage(volume_usage::Unit::Bytes, fs.total_bytes, fs.available_bytes, fs.used_bytes()),
                usage(volume_usage::Unit::Inodes, fs.total_inodes, fs.free_inodes, fs.used_inodes()),
            ],
            VolumeStats::Block { total_bytes } => {
                vec![csi::VolumeUsage {
                    total: total_bytes as i64,
                    unit: volume_usage::Unit::Bytes as i32,
                    ..Default::default()
                }]
            }
        };
        let volume_condition =
            Some(csi::VolumeCondition { abnormal: condition.is_some(), message: condition.unwrap_or_default() });
        Ok(Response::new(csi::NodeGetVolumeStatsResponse { usage, volume_condition }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        const METHOD: &str = "NodeExpandVolume";
        let req = request.into_inner();
        self.required(METHOD, &req.volume_id, "volume_id", &req.volume_id)?;
        self.required(METHOD, &req.volume_id, "volume_path", &req.volume_path)?;
        if let Some(cap) = req.volume_capability.as_ref() {
            Capability::parse(cap).map_err(|e| self.rpc.refuse(METHOD, &req.volume_id, e))?;
        }
        let id = self.volume_id(METHOD, &req.volume_id)?;
        let engine = Arc::clone(&self.engine);
        let required = req.capacity_range.map_or(0, |r| r.required_bytes);
        let path = req.volume_path;
        let capacity =
            self.rpc.blocking(METHOD, &req.volume_id, move || engine.node_expand_volume(&id, &path, required)).await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse { capacity_bytes: capacity as i64 }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type;
        let capabilities = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.engine.node_id().to_owned(),
            max_volumes_per_node: self.max_volumes_per_node,
            accessible_topology: Some(node_topology(self.engine.node_id())),
        }))
    }
}
