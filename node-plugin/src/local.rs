//! `plinth.v1.Local`: the node's own view of where its volumes are mounted and what its
//! snapshots are called, for the CLI.

use std::sync::Arc;

use plinth_controller::rpc::Rpc;
use plinth_engine::Engine;
use plinth_proto::local::{
    ListMountsRequest, ListMountsResponse, ListSnapshotsRequest, ListSnapshotsResponse, SnapshotInfo, VolumeMounts,
    local_server::Local,
};
use tonic::{Request, Response, Status};

pub struct LocalService {
    engine: Arc<Engine>,
    rpc: Rpc,
}

impl LocalService {
    pub fn new(engine: Arc<Engine>, rpc: Rpc) -> Self {
        Self { engine, rpc }
    }
}

#[tonic::async_trait]
impl Local for LocalService {
    async fn list_mounts(&self, _: Request<ListMountsRequest>) -> Result<Response<ListMountsResponse>, Status> {
        let engine = Arc::clone(&self.engine);
        let mounts = self.rpc.blocking("ListMounts", "", move || engine.volume_mounts()).await?;
        let volumes = mounts
            .into_iter()
            .map(|m| VolumeMounts {
                volume_id: m.id.to_string(),
                staging_path: m.staging_path.map(|p| p.display().to_string()).unwrap_or_default(),
                published_paths: m.published.iter().map(|p| p.display().to_string()).collect(),
            })
            .collect();
        Ok(Response::new(ListMountsResponse { volumes }))
    }

    async fn list_snapshots(
        &self,
        _: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let engine = Arc::clone(&self.engine);
        let (records, _) = self.rpc.blocking("ListSnapshots", "", move || engine.list_snapshots("", 0, "", "")).await?;
        let snapshots = records
            .into_iter()
            .map(|s| SnapshotInfo {
                snapshot_id: s.id.to_string(),
                name: s.name,
                source_volume_id: s.source_volume_id.to_string(),
                size_bytes: s.size_bytes.min(i64::MAX as u64) as i64,
                created_at_seconds: s.created_at_seconds,
                copy_method: s.copy_method,
                group_snapshot_id: s.group_snapshot_id.map(|g| g.to_string()).unwrap_or_default(),
                fs_type: s.layout.fs_type().map(|fs| fs.as_str().to_owned()).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(ListSnapshotsResponse { snapshots }))
    }
}
