//! A real Kubernetes control plane for tests: etcd, kube-apiserver and optionally
//! kube-controller-manager (PV binder + expander; with `ControlPlane::start_with_node_controllers`
//! also what the pods of a real node, `crate::node`, need) and kube-scheduler, built from the Go
//! module proxy by `tests/k8s/build-components.sh`, listening on 127.0.0.1 with free ports in a
//! temp dir, with a self-made CA, serving and admin certificates and a service-account key. Every
//! process dies with the harness (on drop, on panic, and with the test process itself).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Paths of the built components, from the environment `tests/run-all.sh` sets up.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    pub controller_manager: PathBuf,
    pub scheduler: PathBuf,
    pub version: String,
    /// kubelet and kubectl (`PLINTH_KUBELET`, `PLINTH_KUBECTL`): only the real-node tests
    /// (`crate::node`) need them, so their absence does not skip the control-plane tests.
    pub kubelet: Option<PathBuf>,
    pub kubectl: Option<PathBuf>,
    /// The standard CSI infrastructure beside Kubernetes, built from the Go module proxy with the
    /// rest (`PLINTH_SNAPSHOT_CONTROLLER`, `PLINTH_SNAPSHOT_CRDS` — a directory of the
    /// external-snapshotter client's CRDs —, `PLINTH_CSI_SNAPSHOTTER`, `PLINTH_CSI_RESIZER`,
    /// `PLINTH_CSI_PROVISIONER`): only the snapshot and sidecar tests need them.
    pub snapshot_controller: Option<PathBuf>,
    pub snapshot_crds: Option<PathBuf>,
    pub csi_snapshotter: Option<PathBuf>,
    pub csi_resizer: Option<PathBuf>,
    pub csi_provisioner: Option<PathBuf>,
}

impl Binaries {
    /// `None` when the components were not built (the tests that need them are #[ignore]d and
    /// fail when asked to run without them).
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        (|| {
            Some(Binaries {
                etcd: var("PLINTH_ETCD")?.into(),
                apiserver: var("PLINTH_KUBE_APISERVER")?.into(),
                controller_manager: var("PLINTH_KUBE_CONTROLLER_MANAGER")?.into(),
                scheduler: var("PLINTH_KUBE_SCHEDULER")?.into(),
                version: var("PLINTH_K8S_VERSION")?,
                kubelet: var("PLINTH_KUBELET").map(PathBuf::from),
                kubectl: var("PLINTH_KUBECTL").map(PathBuf::from),
                snapshot_controller: var("PLINTH_SNAPSHOT_CONTROLLER").map(PathBuf::from),
                snapshot_crds: var("PLINTH_SNAPSHOT_CRDS").map(PathBuf::from),
                csi_snapshotter: var("PLINTH_CSI_SNAPSHOTTER").map(PathBuf::from),
                csi_resizer: var("PLINTH_CSI_RESIZER").map(PathBuf::from),
                csi_provisioner: var("PLINTH_CSI_PROVISIONER").map(PathBuf::from),
            })
        })()
    }
}

#[macro_export]
macro_rules! require_control_plane {
    () => {
        match $crate::k8s::Binaries::from_env() {
            Some(binaries) => binaries,
            None => {
                panic!("the Kubernetes components are not built: run tests/run-all.sh (tests/k8s/build-components.sh)")
            }
        }
    };
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Run kube-controller-manager with the PV binder and expander controllers.
    pub controller_manager: bool,
    pub scheduler: bool,
}

pub struct ControlPlane {
    dir: tempfile::TempDir,
    processes: Vec<(String, Child)>,
    /// How each process was started (program, arguments), for `restart_apiserver`.
    commands: Vec<(String, std::ffi::OsString, Vec<std::ffi::OsString>)>,
    pub kubeconfig: PathBuf,
    pub server: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("port").port()
}

struct Pki {
    ca: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    sa_private: PathBuf,
    sa_public: PathBuf,
}

fn write_pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write pki file");
        path
    };
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "plinth-test-ca");
    ca_params.distinguished_name = dn;
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, &ca_key);

    let serving_key = KeyPair::generate().expect("serving key");
    let mut serving = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ])
    .expect("serving params");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &issuer).expect("serving cert");

    let admin_key = KeyPair::generate().expect("admin key");
    let mut admin = CertificateParams::new(Vec::<String>::new()).expect("admin params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "plinth-test-admin");
    dn.push(DnType::OrganizationName, "system:masters");
    admin.distinguished_name = dn;
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer).expect("admin cert");

    let sa_key = KeyPair::generate().expect("service account key");
    Pki {
        ca: write("ca.crt", &ca_cert.pem()),
        serving_cert: write("apiserver.crt", &serving_cert.pem()),
        serving_key: write("apiserver.key", &serving_key.serialize_pem()),
        admin_cert: write("admin.crt", &admin_cert.pem()),
        admin_key: write("admin.key", &admin_key.serialize_pem()),
        sa_private: write("sa.key", &sa_key.serialize_pem()),
        sa_public: write("sa.pub", &sa_key.public_key_pem()),
    }
}

/// The PV controllers every kube-controller-manager here runs.
const PV_CONTROLLERS: &str = "persistentvolume-binder-controller,persistentvolume-expander-controller,\
persistentvolumeclaim-protection-controller,persistentvolume-protection-controller";

/// What pods on a real node (`crate::node`) need on top of the PV controllers: service accounts
/// and their tokens (the ServiceAccount admission plugin refuses pods until a namespace's
/// "default" account exists), the kube-root-ca.crt ConfigMap (projected service-account volumes
/// wait for it), the workload controllers (DaemonSet, Deployment, ReplicaSet) and garbage
/// collection, node lifecycle (it lifts the not-ready taint kubelet registers with), namespace
/// deletion, pod GC, attach/detach and generic ephemeral volumes.
const NODE_CONTROLLERS: &str = "serviceaccount-controller,serviceaccount-token-controller,\
root-ca-certificate-publisher-controller,daemonset-controller,deployment-controller,replicaset-controller,\
garbage-collector-controller,node-lifecycle-controller,namespace-controller,pod-garbage-collector-controller,\
persistentvolume-attach-detach-controller,ephemeral-volume-controller";

impl ControlPlane {
    pub async fn start(binaries: &Binaries, options: Options) -> Self {
        Self::start_inner(binaries, options, false).await
    }

    /// A control plane for a real node (`crate::node::TestNode`): kube-controller-manager runs
    /// the PV controllers and [`NODE_CONTROLLERS`] (whatever `options.controller_manager` says);
    /// `options.scheduler` as given. A separate constructor rather than an [`Options`] field, so
    /// existing `Options { .. }` literals keep compiling.
    pub async fn start_with_node_controllers(binaries: &Binaries, options: Options) -> Self {
        Self::start_inner(binaries, Options { controller_manager: true, ..options }, true).await
    }

    async fn start_inner(binaries: &Binaries, options: Options, node_controllers: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("plinth-k8s-").tempdir_in("/tmp").expect("temp dir");
        let pki = write_pki(dir.path());
        let mut plane = ControlPlane {
            kubeconfig: dir.path().join("admin.kubeconfig"),
            server: String::new(),
            processes: Vec::new(),
            commands: Vec::new(),
            dir,
        };
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_data = plane.dir.path().join("etcd");
        plane.spawn(
            "etcd",
            Command::new(&binaries.etcd)
                .arg("--name=test")
                .arg(format!("--data-dir={}", etcd_data.display()))
                .arg(format!("--listen-client-urls={etcd_url}"))
                .arg(format!("--advertise-client-urls={etcd_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=test={peer_url}"))
                .arg("--log-level=warn")
                .arg("--unsafe-no-fsync"),
        );
        plane.server = format!("https://127.0.0.1:{api_port}");
        plane.spawn(
            "kube-apiserver",
            Command::new(&binaries.apiserver)
                .arg(format!("--etcd-servers={etcd_url}"))
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1")
                // The kubernetes Service endpoint cannot point at loopback; nothing here needs it.
                .arg("--endpoint-reconciler-type=none")
                .arg(format!("--secure-port={api_port}"))
                .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
                .arg(format!("--tls-private-key-file={}", pki.serving_key.display()))
                .arg(format!("--client-ca-file={}", pki.ca.display()))
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg(format!("--service-account-key-file={}", pki.sa_public.display()))
                .arg(format!("--service-account-signing-key-file={}", pki.sa_private.display()))
                .arg("--authorization-mode=RBAC")
                .arg("--service-cluster-ip-range=10.96.0.0/24")
                .arg("--allow-privileged=true")
                .arg(format!("--cert-dir={}", plane.dir.path().join("apiserver-certs").display())),
        );
        plane.write_kubeconfig(&pki);
        plane.wait_ready().await;
        let kubeconfig = plane.kubeconfig.display().to_string();
        if options.controller_manager {
            let mut command = Command::new(&binaries.controller_manager);
            command
                .arg(format!("--kubeconfig={kubeconfig}"))
                .arg("--leader-elect=false")
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--secure-port={}", free_port()))
                .arg(format!("--cert-dir={}", plane.dir.path().join("kcm-certs").display()))
                .arg("--use-service-account-credentials=false");
            if node_controllers {
                command
                    .arg(format!("--controllers={PV_CONTROLLERS},{NODE_CONTROLLERS}"))
                    // The token controller signs with the apiserver's service-account key and puts
                    // the CA in every token Secret; the publisher puts it in kube-root-ca.crt.
                    .arg(format!("--service-account-private-key-file={}", pki.sa_private.display()))
                    .arg(format!("--root-ca-file={}", pki.ca.display()))
                    // The attach/detach controller creates its FlexVolume dir (default under
                    // /usr/libexec/kubernetes): keep it in the temp dir.
                    .arg(format!("--flex-volume-plugin-dir={}", plane.dir.path().join("flexvolume").display()))
                    // Lift the not-ready taint within 2 s of the node turning Ready (default: 5 s).
                    .arg("--node-monitor-period=2s");
            } else {
                command.arg(format!("--controllers={PV_CONTROLLERS}"));
            }
            plane.spawn("kube-controller-manager", &mut command);
        }
        if options.scheduler {
            plane.spawn(
                "kube-scheduler",
                Command::new(&binaries.scheduler)
                    .arg(format!("--kubeconfig={kubeconfig}"))
                    .arg("--leader-elect=false")
                    .arg("--bind-address=127.0.0.1")
                    .arg(format!("--secure-port={}", free_port()))
                    .arg(format!("--cert-dir={}", plane.dir.path().join("scheduler-certs").display())),
            );
        }
        plane
    }

    /// Installs what a cluster admin installs for snapshots, as they would: the external-snapshotter
    /// CRDs (snapshot.storage.k8s.io, groupsnapshot.storage.k8s.io) and the common
    /// snapshot-controller, here a process beside the control plane.
    pub async fn install_snapshot_controller(&mut self, binaries: &Binaries) {
        let crds = binaries.snapshot_crds.clone().expect("PLINTH_SNAPSHOT_CRDS (tests/k8s/build-components.sh)");
        let controller =
            binaries.snapshot_controller.clone().expect("PLINTH_SNAPSHOT_CONTROLLER (tests/k8s/build-components.sh)");
        let client = self.client().await;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&crds)
            .unwrap_or_else(|e| panic!("reading {}: {e}", crds.display()))
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        assert!(files.len() >= 6, "the snapshot CRDs in {}: {files:?}", crds.display());
        for file in &files {
            for object in read_manifests(file) {
                let applied = apply(&client, &object).await;
                wait_crd_established(&client, applied.metadata.name.as_deref().expect("CRD name")).await;
            }
        }
        let kubeconfig = self.kubeconfig.display().to_string();
        self.spawn(
            "snapshot-controller",
            Command::new(controller)
                .arg(format!("--kubeconfig={kubeconfig}"))
                .arg("--leader-election=false")
                .arg("-v=4"),
        );
    }

    /// Runs `command` beside the control plane (its output in `<name>.log` in the plane's dir,
    /// stopped with the plane): how the tests run cluster infrastructure such as sidecars.
    pub fn spawn(&mut self, name: &str, command: &mut Command) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file");
        self.commands.push((
            name.to_owned(),
            command.get_program().to_owned(),
            command.get_args().map(ToOwned::to_owned).collect(),
        ));
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.processes.push((name.to_owned(), child));
    }

    /// Kills kube-apiserver (SIGKILL, as a crash) and starts it again with the same arguments on
    /// the same port; returns once it is ready. etcd keeps the state.
    pub async fn restart_apiserver(&mut self) {
        let name = "kube-apiserver";
        let at = self.processes.iter().position(|(n, _)| n == name).expect("kube-apiserver runs");
        let (_, mut child) = self.processes.remove(at);
        child.kill().expect("kill kube-apiserver");
        child.wait().expect("reap kube-apiserver");
        let at = self.commands.iter().position(|(n, _, _)| n == name).expect("kube-apiserver's command");
        let (_, program, args) = self.commands.remove(at);
        self.spawn(name, Command::new(program).args(args));
        self.wait_ready().await;
    }

    fn write_kubeconfig(&self, pki: &Pki) {
        let credentials =
            format!("client-certificate: {}\n    client-key: {}", pki.admin_cert.display(), pki.admin_key.display());
        std::fs::write(&self.kubeconfig, self.kubeconfig_text(&pki.ca, "admin", &credentials))
            .expect("write kubeconfig");
    }

    /// A kubeconfig for this plane's server, as `user` with `credentials` (the user's fields).
    fn kubeconfig_text(&self, ca: &Path, user: &str, credentials: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
             users:\n- name: {user}\n  user:\n    {credentials}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\ncurrent-context: test\n",
            server = self.server,
            ca = ca.display(),
        )
    }

    /// A kubeconfig that authenticates as a service account the way a pod does: with a token
    /// the TokenRequest API issued for it (valid 2 hours), so a plinth process under test has
    /// exactly the RBAC deploy/ grants it and costs the API server what it costs in a cluster.
    /// The account must exist.
    pub async fn kubeconfig_with_token(&self, client: &kube::Client, namespace: &str, name: &str) -> PathBuf {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;
        let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec { expiration_seconds: Some(7200), ..Default::default() }),
            ..Default::default()
        };
        let issued = accounts
            .create_token_request(name, &Default::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("a token for service account {namespace}/{name}: {e}"));
        let token = issued.status.and_then(|s| s.token).expect("TokenRequest status with a token");
        let text = self.kubeconfig_text(&self.ca_file(), name, &format!("token: {token}"));
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// A log's last lines, for failure messages.
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Whether the process started as `name` (by [`spawn`](Self::spawn)) has exited, and how.
    pub fn exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        let (_, child) = self.processes.iter_mut().find(|(n, _)| n == name)?;
        child.try_wait().ok().flatten()
    }

    fn check_alive(&mut self) {
        for (name, child) in &mut self.processes {
            if let Ok(Some(status)) = child.try_wait() {
                let name = name.clone();
                panic!("{name} exited ({status}):\n{}", self.log_tail(&name));
            }
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            self.check_alive();
            if let Ok(client) = self.try_client(None).await {
                let request = http::Request::get("/readyz").body(Vec::new()).expect("request");
                if client.request_text(request).await.is_ok_and(|t| t.trim() == "ok") {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("kube-apiserver not ready after 90 s:\n{}", self.log_tail("kube-apiserver"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn try_client(&self, impersonate: Option<(&str, &[&str])>) -> Result<kube::Client, String> {
        let mut kubeconfig = Kubeconfig::read_from(&self.kubeconfig).map_err(|e| e.to_string())?;
        if let Some((user, groups)) = impersonate {
            for named in &mut kubeconfig.auth_infos {
                if let Some(auth) = named.auth_info.as_mut() {
                    auth.impersonate = Some(user.to_owned());
                    auth.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
                }
            }
        }
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        plinth_cluster::api_client::connect(config).map_err(|e| e.to_string())
    }

    /// A cluster-admin client.
    pub async fn client(&self) -> kube::Client {
        self.try_client(None).await.expect("admin client")
    }

    /// A client acting as a service account (impersonation), with the groups it would have.
    pub async fn client_as_service_account(&self, namespace: &str, name: &str) -> kube::Client {
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let ns_group = format!("system:serviceaccounts:{namespace}");
        let groups = ["system:serviceaccounts", ns_group.as_str(), "system:authenticated"];
        self.try_client(Some((&user, &groups))).await.expect("impersonating client")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA that signed the apiserver's serving certificate (and every client certificate).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The apiserver's port on 127.0.0.1: what a hostNetwork pod needs as
    /// KUBERNETES_SERVICE_HOST=127.0.0.1 / KUBERNETES_SERVICE_PORT (the `kubernetes` Service has
    /// no endpoints here, see `--endpoint-reconciler-type=none`).
    pub fn api_port(&self) -> u16 {
        self.server.rsplit(':').next().and_then(|port| port.parse().ok()).expect("server URL has a port")
    }
}

/// The established TCP connections process `pid` holds to `port` on this host.
pub fn connections_to(pid: i32, port: u16) -> usize {
    local_ports_to(pid, port).len()
}

/// The local ports of the established TCP connections process `pid` holds to `port` on this
/// host: its socket fds matched against the kernel's TCP tables (IPv4 and IPv6) by inode.
pub fn local_ports_to(pid: i32, port: u16) -> Vec<u16> {
    let sockets: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|target| {
                    let target = target.to_string_lossy().into_owned();
                    Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let port_of = |address: &str| address.rsplit(':').next().and_then(|hex| u16::from_str_radix(hex, 16).ok());
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|table| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|line| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            let wanted = fields.len() > 9
                && port_of(fields[2]) == Some(port)
                && fields[3] == "01"
                && sockets.contains(fields[9]);
            if wanted { port_of(fields[1]) } else { None }
        })
        .collect()
}

/// The comment on every netfilter rule a test adds, so a leak check can find them.
pub const NETFILTER_COMMENT: &str = "plinth-test-silenced";

/// Loopback TCP connections silenced while this lives: netfilter drops their packets both ways,
/// so neither end hears from the other and nothing resets them — the connection a vanished
/// server, a dropped NAT entry or a forgetful load balancer leaves behind. New connections to the
/// same server are not touched. Dropping the guard deletes the rules.
pub struct SilencedConnections {
    rules: Vec<Vec<String>>,
}

impl SilencedConnections {
    /// Silences the connections from `client_ports` to `server_port` on 127.0.0.1.
    pub fn new(server_port: u16, client_ports: &[u16]) -> Self {
        let mut silenced = Self { rules: Vec::new() };
        for &client in client_ports {
            for (from, to) in [(client, server_port), (server_port, client)] {
                // Fixed words and port numbers only: no argument has a space to split on.
                let rule: Vec<String> = format!(
                    "-p tcp -s 127.0.0.1 -d 127.0.0.1 --sport {from} --dport {to} \
                     -m comment --comment {NETFILTER_COMMENT} -j DROP"
                )
                .split_whitespace()
                .map(str::to_owned)
                .collect();
                iptables("-I", &rule).unwrap_or_else(|e| panic!("silencing {from} → {to}: {e}"));
                silenced.rules.push(rule);
            }
        }
        silenced
    }
}

impl Drop for SilencedConnections {
    fn drop(&mut self) {
        for rule in &self.rules {
            if let Err(e) = iptables("-D", rule) {
                eprintln!("could not delete the netfilter rule {rule:?}: {e}");
            }
        }
    }
}

fn iptables(action: &str, rule: &[String]) -> Result<(), String> {
    let out = Command::new("iptables")
        .args(["-w", action, "INPUT"])
        .args(rule)
        .output()
        .map_err(|e| format!("iptables: {e}"))?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()) }
}

/// When a test fails (or `PLINTH_TEST_KEEP_LOGS` is set, for benchmarks) and `PLINTH_TEST_LOGS`
/// names a directory, copies the `*.log` files of `dir` there (into a subdirectory named after
/// `dir`), so the processes' logs outlive the temp dirs.
pub fn keep_logs_on_failure(dir: &Path) {
    let keep = std::thread::panicking() || std::env::var_os("PLINTH_TEST_KEEP_LOGS").is_some();
    let Some(into) = std::env::var_os("PLINTH_TEST_LOGS").filter(|_| keep) else { return };
    let into = PathBuf::from(into).join(dir.file_name().unwrap_or_default());
    if std::fs::create_dir_all(&into).is_err() {
        return;
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let _ = std::fs::copy(&path, into.join(entry.file_name()));
        }
    }
    eprintln!("logs kept in {}", into.display());
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        keep_logs_on_failure(self.dir.path());
        // Dependants first: scheduler and controller manager, then the apiserver, then etcd.
        for (_, child) in self.processes.iter_mut().rev() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn yaml_documents(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|doc| {
            let value = serde_json::Value::deserialize(doc).expect("valid YAML");
            (!value.is_null()).then_some(value)
        })
        .collect()
}

pub fn read_manifests(path: &Path) -> Vec<serde_json::Value> {
    yaml_documents(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
}

/// Runs kubectl against `plane`; its stdout, or why it failed.
pub fn kubectl(binaries: &Binaries, plane: &ControlPlane, args: &[&str]) -> Result<String, String> {
    let kubectl = binaries.kubectl.as_ref().expect("PLINTH_KUBECTL (tests/k8s/build-components.sh builds kubectl)");
    let output = Command::new(kubectl)
        .arg(format!("--kubeconfig={}", plane.kubeconfig.display()))
        .args(args)
        .output()
        .map_err(|e| format!("running kubectl: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// What `kubectl apply -k dir` would apply: the kustomization rendered by kubectl's own
/// kustomize (`kubectl kustomize`), one JSON value per object.
pub fn kustomize(binaries: &Binaries, dir: &Path) -> Vec<serde_json::Value> {
    let kubectl = binaries.kubectl.as_ref().expect("PLINTH_KUBECTL (tests/k8s/build-components.sh builds kubectl)");
    let output = Command::new(kubectl).arg("kustomize").arg(dir).output().expect("run kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    yaml_documents(&String::from_utf8_lossy(&output.stdout))
}

/// Server-side applies `object` (field manager `plinth-test`), resolving its kind by discovery.
pub async fn apply(client: &kube::Client, object: &serde_json::Value) -> kube::api::DynamicObject {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::discovery::Discovery;
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let kind = object["kind"].as_str().expect("kind");
    let name = object["metadata"]["name"].as_str().expect("name");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = kube::core::GroupVersionKind::gvk(group, version, kind);
    let discovery = Discovery::new(client.clone()).run().await.expect("discovery");
    let (resource, capabilities) =
        discovery.resolve_gvk(&gvk).unwrap_or_else(|| panic!("the server does not know {api_version} {kind}"));
    let api: Api<DynamicObject> = match capabilities.scope {
        kube::discovery::Scope::Namespaced => {
            let ns = object["metadata"]["namespace"].as_str().unwrap_or("default");
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    api.patch(name, &PatchParams::apply("plinth-test").force(), &Patch::Apply(object))
        .await
        .unwrap_or_else(|e| panic!("server-side apply of {kind} {name} was refused: {e}"))
}

/// Waits until the CRD named `name` reports Established.
pub async fn wait_crd_established(client: &kube::Client, name: &str) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let crd = api.get(name).await.expect("get CRD");
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return;
        }
        assert!(Instant::now() < deadline, "CRD {name} never became Established");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `user` (a service account, with its groups) may do `verb` on a resource.
pub async fn allowed(
    client: &kube::Client,
    service_account: (&str, &str),
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
    let (ns, name) = service_account;
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{ns}:{name}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.split('/').next().unwrap_or(resource).into()),
                subresource: resource.split_once('/').map(|(_, sub)| sub.to_owned()),
                namespace: namespace.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: kube::Api<SubjectAccessReview> = kube::Api::all(client.clone());
    let result = api.create(&Default::default(), &review).await.expect("SubjectAccessReview");
    result.status.is_some_and(|s| s.allowed)
}
