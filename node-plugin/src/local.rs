//! `plinth.v1.Local`: the node's own view of where its volumes are mounted, for the CLI.

use std::sync::Arc;

use plinth_controller::rpc::Rpc;
use plinth_engine::Engine;
use plinth_proto::local::{ListMountsRequest, ListMountsResponse, VolumeMounts, local_server::Local};
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
}
