//! Leader election on a real kube-apiserver, with the leader's connection running through a TCP
//! proxy that can stall: bytes stop flowing, nothing errors, nothing closes — what a half-dead
//! network or an overloaded apiserver looks like. The leader must stop acting before a standby
//! can take the lease over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use plinth_cluster::leader::LeaderElection;
use plinth_tests::k8s::{ControlPlane, Options};
use plinth_tests::require_control_plane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A TCP proxy on 127.0.0.1 in front of `upstream`. Once stalled, it forwards nothing more in
/// either direction on any connection, old or new, and keeps every socket open.
struct StallingProxy {
    port: u16,
    stalled: Arc<AtomicBool>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.load(Ordering::SeqCst) {
            // Swallow the bytes and hold both halves open for good.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

impl StallingProxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy listener");
        let port = listener.local_addr().expect("proxy address").port();
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stalled);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let flag = Arc::clone(&flag);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, Arc::clone(&flag)),
                        pump(server_read, client_write, flag)
                    );
                });
            }
        });
        Self { port, stalled }
    }

    fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }
}

/// An admin client that reaches the apiserver through the proxy.
async fn client_through(plane: &ControlPlane, proxy: &StallingProxy) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(&plane.kubeconfig).expect("admin kubeconfig");
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("config");
    config.cluster_url = format!("https://127.0.0.1:{}", proxy.port).parse().expect("proxy URL");
    kube::Client::try_from(config).expect("client through the proxy")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the Kubernetes binaries: tests/run-all.sh runs it"]
async fn a_leader_whose_api_connection_stalls_steps_down_before_a_standby_takes_over() {
    let binaries = require_control_plane!();
    let plane = ControlPlane::start(&binaries, Options::default()).await;
    let proxy = StallingProxy::start(plane.api_port()).await;
    let lease = Duration::from_secs(6);
    let (namespace, name) = ("default", "plinth-leader-test");
    let leader = LeaderElection::new(client_through(&plane, &proxy).await, namespace, name, "leader", lease);
    let standby = LeaderElection::new(plane.client().await, namespace, name, "standby", lease);
    let renew_deadline = leader.renew_deadline();
    assert!(renew_deadline < lease, "the leader gives up before its lease runs out");

    let leadership = tokio::time::timeout(Duration::from_secs(30), leader.acquire()).await.expect("leader elected");
    let stepped_down: Arc<Mutex<Option<Instant>>> = Arc::default();
    let record = Arc::clone(&stepped_down);
    let holding = tokio::spawn(async move {
        leader.hold(leadership).await;
        *record.lock().unwrap() = Some(Instant::now());
    });

    // While the connection works, the leader renews and the standby gets nowhere.
    let too_early = tokio::time::timeout(lease * 2, standby.acquire()).await;
    assert!(too_early.is_err(), "the standby took a lease that was being renewed");
    assert!(stepped_down.lock().unwrap().is_none(), "the leader stepped down while its renewals worked");

    // The leader's connection stalls: its renewals neither succeed nor fail.
    proxy.stall();
    let stalled_at = Instant::now();
    tokio::time::timeout(lease * 4, standby.acquire()).await.expect("the standby takes over the expired lease");
    let standby_leads_at = Instant::now();

    let leader_stopped_at = stepped_down
        .lock()
        .unwrap()
        .expect("the standby leads while the stalled leader still believes it leads (hold() never returned)");
    assert!(leader_stopped_at < standby_leads_at, "the leader stepped down only after the standby took over");
    let acting_after_stall = leader_stopped_at - stalled_at;
    assert!(
        acting_after_stall <= renew_deadline,
        "the leader acted {acting_after_stall:?} after its connection stalled; its renew deadline is {renew_deadline:?}"
    );
    holding.await.expect("hold task");
}
