//! Serving CSI on a unix socket: bound with mode 0600 before it listens, shut down gracefully
//! on SIGTERM/SIGINT (stop accepting, finish in-flight RPCs), socket removed on exit.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use plinth_controller::identity::{MANIFEST_POOL, MANIFEST_STAGING_ROOT};
use plinth_controller::metrics::Metrics;
use plinth_controller::rpc::Rpc;
use plinth_controller::{ControllerService, GroupControllerService, IdentityService};
use plinth_engine::{Engine, EngineConfig};
use plinth_node::{LocalService, NodeService};
use plinth_proto::csi_v1::{
    controller_server::ControllerServer, group_controller_server::GroupControllerServer,
    identity_server::IdentityServer, node_server::NodeServer,
};
use plinth_proto::local::local_server::LocalServer;
use plinth_socket::{bind, incoming, socket_path};

use crate::cli::{SOCKET_NAME, ServerOpts};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Controller,
    Node,
    Standalone,
}

impl Mode {
    fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::Standalone)
    }
    fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::Standalone)
    }
}

fn hostname() -> anyhow::Result<String> {
    Ok(nix::unistd::gethostname().context("reading the hostname")?.to_string_lossy().into_owned())
}

/// A server running beside the main one (HTTP probes, kubelet registration, sidecar CSI),
/// stopped when the main one stops.
struct Beside {
    name: &'static str,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

type Stopped = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Beside {
    fn spawn<Fut>(name: &'static str, run: impl FnOnce(Stopped) -> Fut) -> Self
    where
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async {
            let _ = stopped.await;
        })));
        Self { name, stop, task }
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?.with_context(|| format!("serving {}", self.name))
    }
}

async fn stop_all(servers: Vec<Beside>) -> anyhow::Result<()> {
    for server in servers {
        server.stop().await?;
    }
    Ok(())
}

async fn spawn_http(
    address: Option<std::net::SocketAddr>,
    engine: Option<Arc<Engine>>,
    ready: crate::http::ReadyCheck,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<Beside>> {
    let Some(address) = address else { return Ok(None) };
    let listener = crate::http::bind(address).await?;
    Ok(Some(Beside::spawn("HTTP", move |stopped| crate::http::serve(listener, engine, ready, metrics, stopped))))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(%err, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing in-flight requests"),
    }
}

pub async fn serve(endpoint: Option<String>, opts: ServerOpts, mode: Mode) -> anyhow::Result<()> {
    // One boundary and one metrics registry for everything this process serves.
    let rpc = Rpc::new(Arc::new(Metrics::new()));
    let kube = crate::cluster::client(&opts).await.context("connecting to Kubernetes")?;
    if let (Mode::Controller, Some(client)) = (mode, &kube) {
        return serve_cluster_controller(client.clone(), &opts, endpoint, rpc).await;
    }
    let endpoint = endpoint.unwrap_or_else(|| format!("unix://{}/{SOCKET_NAME}", opts.data_dir.display()));
    let socket = socket_path(&endpoint)?;
    let node_id = match opts.node_id.clone() {
        Some(id) if !id.is_empty() => id,
        _ => hostname()?,
    };
    let staging_root = opts.data_dir.join("staging");
    let mut allowed_roots = opts.allowed_roots.clone();
    if allowed_roots.is_empty() {
        allowed_roots.push("/var/lib/kubelet".into());
        if mode == Mode::Standalone {
            allowed_roots.push("/mnt".into());
        }
    }
    if mode == Mode::Standalone {
        allowed_roots.push(staging_root.clone());
    }
    let config = EngineConfig {
        data_dir: opts.data_dir.clone(),
        node_id: node_id.clone(),
        allowed_roots,
        default_volume_size: opts.default_volume_size,
        pool_capacity: opts.pool_capacity,
        allowed_mount_options: opts.allowed_mount_options.clone(),
        restore_publications: mode == Mode::Standalone,
    };
    let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::open(config)).await??);
    if mode.node() {
        let reconciling = Arc::clone(&engine);
        let report = tokio::task::spawn_blocking(move || reconciling.reconcile_on_start()).await?;
        for line in &report.restored {
            tracing::info!("reconcile: restored {line}");
        }
        for id in &report.detached {
            tracing::info!("reconcile: detached unused loop device of {id}");
        }
        for problem in &report.problems {
            tracing::warn!("reconcile: {problem}");
        }
        // Environment faults are reported at start, not discovered at the first stage.
        for support in engine.filesystem_support() {
            if !support.format || !support.grow {
                let package = plinth_engine::sys::mkfs::tools(support.fs).package;
                tracing::warn!(
                    fs = support.fs.as_str(),
                    format = support.format,
                    grow = support.grow,
                    "this node cannot fully serve {} volumes: install the {package} package",
                    support.fs.as_str()
                );
            }
        }
    }

    if let (true, Some(client)) = (mode.node(), kube) {
        crate::cluster::spawn_node_agent(client, Arc::clone(&engine), &opts, Arc::clone(rpc.metrics()));
    }

    let mut manifest = HashMap::from([(MANIFEST_POOL.to_owned(), engine.pool_dir().display().to_string())]);
    if mode == Mode::Standalone {
        manifest.insert(MANIFEST_STAGING_ROOT.to_owned(), staging_root.display().to_string());
    }
    let identity =
        IdentityService::new(Some(Arc::clone(&engine)), mode.controller(), mode.node(), manifest, rpc.clone());
    let controller =
        mode.controller().then(|| ControllerServer::new(ControllerService::new(Arc::clone(&engine), rpc.clone())));
    let group = mode
        .controller()
        .then(|| GroupControllerServer::new(GroupControllerService::new(Arc::clone(&engine), rpc.clone())));
    let node = mode
        .node()
        .then(|| NodeServer::new(NodeService::new(Arc::clone(&engine), rpc.clone(), opts.max_volumes_per_node)));
    let local = mode.node().then(|| LocalServer::new(LocalService::new(Arc::clone(&engine), rpc.clone())));

    let listener = bind(&socket)?;
    let mut beside: Vec<Beside> = Vec::new();
    if let (Some(kubelet_dir), true) = (&opts.kubelet_dir, mode.node()) {
        let (dir, endpoint) = (kubelet_dir.clone(), socket.clone());
        beside.push(Beside::spawn("kubelet registration", move |stopped| {
            crate::registration::serve(dir, endpoint, stopped)
        }));
    }
    let ready = crate::http::engine_ready(Arc::clone(&engine), mode.node());
    beside.extend(spawn_http(opts.http_address, Some(Arc::clone(&engine)), ready, Arc::clone(rpc.metrics())).await?);
    tracing::info!(
        endpoint = %endpoint, node_id = %node_id, mode = ?mode, data_dir = %opts.data_dir.display(),
        allowed_roots = ?engine.allowed_roots(), "plinth serving"
    );
    let result = plinth_socket::server()
        .add_service(IdentityServer::new(identity))
        .add_optional_service(controller)
        .add_optional_service(group)
        .add_optional_service(node)
        .add_optional_service(local)
        .serve_with_incoming_shutdown(incoming(listener), shutdown_signal())
        .await;
    let _ = std::fs::remove_file(&socket);
    stop_all(beside).await?;
    result.context("serving CSI")?;
    tracing::info!("plinth stopped");
    Ok(())
}

/// Cluster-mode controller: no pool; the kube-rs controller plus probes, and — when `--endpoint`
/// is given — a CSI Controller and GroupController socket for the standard external-provisioner,
/// external-resizer and csi-snapshotter sidecars. A standby replica serves it too (sidecars elect
/// their own leader).
async fn serve_cluster_controller(
    client: kube::Client,
    opts: &ServerOpts,
    endpoint: Option<String>,
    rpc: Rpc,
) -> anyhow::Result<()> {
    let mut beside: Vec<Beside> = Vec::new();
    if let Some(endpoint) = endpoint {
        let socket = socket_path(&endpoint)?;
        let listener = bind(&socket)?;
        let identity = IdentityService::new(None, true, false, HashMap::new(), rpc.clone());
        let controller = plinth_cluster::csi_controller::ClusterController::new(client.clone(), rpc.clone());
        let group =
            plinth_cluster::csi_snapshots::ClusterGroupController::new(client.clone(), rpc.clone(), controller.wait());
        tracing::info!(%endpoint, "serving the CSI Controller for sidecars");
        beside.push(Beside::spawn("CSI", move |stopped| async move {
            let served = plinth_socket::server()
                .add_service(IdentityServer::new(identity))
                .add_service(ControllerServer::new(controller))
                .add_service(GroupControllerServer::new(group))
                .serve_with_incoming_shutdown(incoming(listener), stopped)
                .await;
            let _ = std::fs::remove_file(&socket);
            Ok(served?)
        }));
    }
    // The cluster controller's readiness is its process being up; leadership is separate.
    let metrics = Arc::clone(rpc.metrics());
    beside.extend(spawn_http(opts.http_address, None, Arc::new(|| Ok(())), Arc::clone(&metrics)).await?);
    tracing::info!(namespace = %opts.namespace, leader_elect = opts.leader_elect, "plinth cluster controller starting");
    let result = crate::cluster::run_controller(client, opts, metrics, shutdown_signal()).await;
    stop_all(beside).await?;
    result
}
