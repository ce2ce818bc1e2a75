//! kubelet plugin registration: a socket in `<kubelet-dir>/plugins_registry/` that tells kubelet
//! where plinth's CSI socket is. kubelet finds it by watching the directory.

use std::path::{Path, PathBuf};

use plinth_proto::DRIVER_NAME;
use plinth_proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use plinth_proto::pluginregistration::{InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse};
use tonic::{Request, Response, Status};

/// CSI versions kubelet may speak to plinth with.
const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];

struct Registrar {
    csi_endpoint: PathBuf,
}

#[tonic::async_trait]
impl Registration for Registrar {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: "CSIPlugin".to_owned(),
            name: DRIVER_NAME.to_owned(),
            endpoint: self.csi_endpoint.display().to_string(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!("kubelet registered plinth");
        } else {
            tracing::error!(error = %status.error, "kubelet refused plinth's registration");
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

pub fn registration_socket(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir.join("plugins_registry").join(format!("{DRIVER_NAME}-reg.sock"))
}

/// Serves the registration socket until `shutdown` resolves; removes it afterwards.
pub async fn serve(
    kubelet_dir: PathBuf,
    csi_endpoint: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let socket = registration_socket(&kubelet_dir);
    let listener = plinth_socket::bind(&socket)?;
    tracing::info!(socket = %socket.display(), "serving kubelet plugin registration");
    let result = plinth_socket::server()
        .add_service(RegistrationServer::new(Registrar { csi_endpoint }))
        .serve_with_incoming_shutdown(plinth_socket::incoming(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&socket);
    Ok(result?)
}
