//! CSI Identity: who we are, what we serve, and whether we are ready.

use std::collections::HashMap;
use std::sync::Arc;

use plinth_engine::Engine;
use plinth_proto::DRIVER_NAME;
use plinth_proto::csi_v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    PluginCapability, ProbeRequest, ProbeResponse, identity_server::Identity, plugin_capability,
};
use tonic::{Request, Response, Status};

/// Manifest key: where standalone keeps staging mounts (the CLI stages volumes there).
pub const MANIFEST_STAGING_ROOT: &str = "plinth.csi.dev/staging-root";
/// Manifest key: the pool directory holding the images.
pub const MANIFEST_POOL: &str = "plinth.csi.dev/pool";
/// Manifest key: the filesystems this node can format now (comma-separated), from the tools
/// installed on it.
pub const MANIFEST_FILESYSTEMS: &str = "plinth.csi.dev/filesystems";
/// Manifest key: the filesystems this node can grow now.
pub const MANIFEST_GROWABLE: &str = "plinth.csi.dev/growable-filesystems";

use crate::rpc::Rpc;

pub struct IdentityService {
    /// The local pool to probe; `None` for the cluster controller, which owns no pool.
    engine: Option<Arc<Engine>>,
    serves_controller: bool,
    serves_node: bool,
    manifest: HashMap<String, String>,
    rpc: Rpc,
}

impl IdentityService {
    pub fn new(
        engine: Option<Arc<Engine>>,
        serves_controller: bool,
        serves_node: bool,
        manifest: HashMap<String, String>,
        rpc: Rpc,
    ) -> Self {
        Self { engine, serves_controller, serves_node, manifest, rpc }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        let mut manifest = self.manifest.clone();
        if let (Some(engine), true) = (&self.engine, self.serves_node) {
            // Checked at each call: installing xfsprogs on a running node shows up at once.
            let support = engine.filesystem_support();
            let list = |pick: fn(&plinth_engine::support::FsSupport) -> bool| {
                support.iter().filter(|s| pick(s)).map(|s| s.fs.as_str()).collect::<Vec<_>>().join(",")
            };
            manifest.insert(MANIFEST_FILESYSTEMS.to_owned(), list(|s| s.format));
            manifest.insert(MANIFEST_GROWABLE.to_owned(), list(|s| s.grow));
        }
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest,
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type;
        let mut types = vec![Type::VolumeAccessibilityConstraints];
        if self.serves_controller {
            types.insert(0, Type::ControllerService);
            types.push(Type::GroupControllerService);
        }
        let mut capabilities: Vec<PluginCapability> = types
            .into_iter()
            .map(|t| PluginCapability {
                r#type: Some(plugin_capability::Type::Service(plugin_capability::Service { r#type: t as i32 })),
            })
            .collect();
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(plugin_capability::VolumeExpansion {
                r#type: plugin_capability::volume_expansion::Type::Online as i32,
            })),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let Some(engine) = self.engine.clone() else {
            return Ok(Response::new(ProbeResponse { ready: Some(true) }));
        };
        let node = self.serves_node;
        self.rpc.blocking("Probe", "", move || engine.probe(node)).await?;
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
