//! Cluster mode wiring: the Kubernetes client, the leader-elected controller, the node agent.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};
use plinth_cluster::agent::Agent;
use plinth_cluster::capacity::Publisher;
use plinth_cluster::leader::LeaderElection;
use plinth_cluster::provisioner;
use plinth_controller::metrics::Metrics;
use plinth_engine::Engine;

use crate::cli::ServerOpts;

const LEASE_NAME: &str = "plinth-controller";

/// The Kubernetes client, if this process has cluster access (`--kubeconfig` or in a pod).
pub async fn client(opts: &ServerOpts) -> anyhow::Result<Option<kube::Client>> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => kube::Config::incluster()?,
        None => return Ok(None),
    };
    Ok(Some(plinth_cluster::api_client::connect(config)?))
}

fn identity(opts: &ServerOpts) -> String {
    opts.identity.clone().filter(|i| !i.is_empty()).unwrap_or_else(|| {
        let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        format!("{host}-{}", std::process::id())
    })
}

/// The cluster controller: waits for leadership (when asked to), then reconciles until
/// shutdown. Losing the lease — another holder, or no renewal within the renew deadline — stops
/// the reconcilers at once and ends the process, so a replica never acts as a stale leader.
pub async fn run_controller(
    client: kube::Client,
    opts: &ServerOpts,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let identity = identity(opts);
    let election = opts.leader_elect.then(|| {
        let duration = Duration::from_secs(opts.lease_duration_seconds.max(2));
        Arc::new(LeaderElection::new(client.clone(), &opts.namespace, LEASE_NAME, &identity, duration))
    });
    tokio::pin!(shutdown);
    let mut leadership = None;
    if let Some(election) = &election {
        tracing::info!(%identity, "waiting for leadership");
        tokio::select! {
            held = election.acquire() => leadership = Some(held),
            () = &mut shutdown => return Ok(()),
        }
    }
    let context = Arc::new(provisioner::Context::new(client, &identity, metrics));
    // Renewals run on their own task: a burst of reconciles keeps the reconcilers' task busy, and
    // a renewal polled late is a lease lost.
    let lost = async {
        match (&election, leadership) {
            (Some(election), Some(leadership)) => {
                let election = Arc::clone(election);
                let renewing = tokio::spawn(async move { election.hold(leadership).await });
                // Shutdown drops this future: renewals stop before the lease is released.
                let _stop = AbortOnDrop(renewing.abort_handle());
                let _ = renewing.await;
            }
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        () = plinth_cluster::run_controller(context) => Ok(()),
        () = lost => anyhow::bail!("lost the leader lease; exiting so a fresh replica takes over"),
        () = &mut shutdown => {
            if let Some(election) = &election {
                election.release().await;
            }
            Ok(())
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the node agent (volumes and snapshots) and the capacity publisher in the background.
pub fn spawn_node_agent(client: kube::Client, engine: Arc<Engine>, opts: &ServerOpts, metrics: Arc<Metrics>) {
    let changed = Arc::new(tokio::sync::Notify::new());
    let agent = Arc::new(Agent::new(client.clone(), Arc::clone(&engine), Arc::clone(&changed), metrics));
    tokio::spawn(plinth_cluster::agent::run(Arc::clone(&agent)));
    tokio::spawn(plinth_cluster::agent_snapshots::run(agent));
    let publisher = Publisher { client, engine, namespace: opts.namespace.clone(), changed };
    tokio::spawn(publisher.run());
}
