//! Test support: a real `plinth standalone` process in a temp dir, CSI clients for it, and RAII
//! clean-up that leaves no mount, loop device or file behind even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod deployed;
pub mod k8s;
pub mod node;

use hyper_util::rt::TokioIo;
use plinth_proto::csi_v1::{
    self as csi, controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
    volume_capability,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// Integration tests need root (loop devices, mount). They are #[ignore]d by default, so a plain
/// `cargo test` lists them as ignored; tests/run-all.sh runs them as root with `--include-ignored`.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[macro_export]
macro_rules! require_root {
    () => {
        // These tests are #[ignore]d by default; asked for explicitly, a missing precondition
        // is a failure, never a silent pass.
        assert!($crate::is_root(), "this test needs root (loop devices and mounts): run tests/run-all.sh");
    };
}

/// The `plinth` binary built next to this test executable.
pub fn plinth_bin() -> PathBuf {
    if let Ok(path) = std::env::var("PLINTH_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let bin = dir.join("plinth");
    assert!(bin.exists(), "{} is missing: run `cargo build --bin plinth` first", bin.display());
    bin
}

/// Detaches loop devices backed by files below `dir` and unmounts everything below it. Loop
/// devices go first, while their backing paths still resolve: the kernel then frees each one as
/// soon as its last mount is gone (even a pool filesystem that itself sits on a loop device).
pub fn sweep(dir: &Path) {
    if let Ok(devices) = plinth_engine::sys::loopdev::attached_devices() {
        for (device, backing) in devices {
            if backing.path.starts_with(dir) {
                let _ = plinth_engine::sys::loopdev::detach(device);
            }
        }
    }
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut mounts: Vec<PathBuf> = plinth_engine::sys::mountinfo::parse(&table)
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for mount in mounts {
        let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Loop devices whose backing file is below `dir` (as this process's mount namespace shows it:
/// attachments made in a container show another path, see `LoopSet` for those).
pub fn loop_devices_under(dir: &Path) -> Vec<PathBuf> {
    plinth_engine::sys::loopdev::attached_devices()
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, backing)| backing.path.starts_with(dir))
        .map(|(device, _)| device.path())
        .collect()
}

/// The loop devices attached at one moment, each with its backing file's identity: what was
/// attached since is what a test made, wherever (in whichever mount namespace) it was made.
#[derive(Debug, Clone, Default)]
pub struct LoopSet(Vec<(u32, (u32, u32), u64)>);

impl LoopSet {
    pub fn now() -> Self {
        let devices = plinth_engine::sys::loopdev::attached_devices().unwrap_or_default();
        Self(devices.into_iter().map(|(d, b)| (d.number, b.dev, b.inode)).collect())
    }

    /// Devices attached now that were not attached (to the same file) in `self`.
    pub fn added_since(&self) -> Vec<plinth_engine::sys::loopdev::LoopDevice> {
        plinth_engine::sys::loopdev::attached_devices()
            .unwrap_or_default()
            .into_iter()
            .filter(|(d, b)| !self.0.contains(&(d.number, b.dev, b.inode)))
            .map(|(d, _)| d)
            .collect()
    }
}

/// Mount points below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    plinth_engine::sys::mountinfo::parse(&text)
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// A temp dir holding a plinth data dir and an allowed root; swept and removed on drop.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("plinth-test-").tempdir_in("/tmp").expect("temp dir");
        std::fs::create_dir_all(dir.path().join("root")).expect("allowed root");
        Self { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }
    pub fn root(&self) -> PathBuf {
        self.path().join("root")
    }
    pub fn socket(&self) -> PathBuf {
        self.path().join("csi.sock")
    }
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    /// Files currently in the pool: volume images and snapshot images.
    pub fn pool_images(&self) -> Vec<PathBuf> {
        let pool = self.data_dir().join("pool");
        [pool.clone(), pool.join("snapshots")]
            .iter()
            .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect()
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        sweep(self.dir.path());
    }
}

/// A running `plinth standalone`; SIGTERM and reaped on drop.
pub struct Plinth {
    child: Option<Child>,
    socket: PathBuf,
    pub log: PathBuf,
}

impl Plinth {
    pub fn start(sandbox: &Sandbox, extra: &[&str]) -> Self {
        Self::start_with_data_dir(sandbox, &sandbox.data_dir(), extra)
    }

    pub fn start_with_data_dir(sandbox: &Sandbox, data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_mode(sandbox, "standalone", data_dir, extra)
    }

    /// `mode` is `standalone`, `node` or `controller`.
    pub fn start_mode(sandbox: &Sandbox, mode: &str, data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_at(&sandbox.socket(), &sandbox.root(), mode, data_dir, extra, true)
    }

    /// Full control: socket, allowed root, mode, data dir; `wait` for the CSI socket (a cluster
    /// controller serves none).
    pub fn start_at(socket: &Path, root: &Path, mode: &str, data_dir: &Path, extra: &[&str], wait: bool) -> Self {
        Self::start_with_env(socket, root, mode, data_dir, extra, wait, &[])
    }

    /// [`start_at`](Self::start_at) with extra environment variables for the process.
    pub fn start_with_env(
        socket: &Path,
        root: &Path,
        mode: &str,
        data_dir: &Path,
        extra: &[&str],
        wait: bool,
        env: &[(&str, &str)],
    ) -> Self {
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let child = Command::new(plinth_bin())
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg(mode)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--allowed-root")
            .arg(root)
            .args(if extra.contains(&"--node-id") { &[][..] } else { &["--node-id", "test-node"][..] })
            .args(extra)
            .env("PLINTH_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn plinth");
        let plinth = Self { child: Some(child), socket: socket.to_owned(), log };
        if wait {
            plinth.wait_ready();
        }
        plinth
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("plinth did not start; log:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
    }

    /// The exit status once the process has ended (it is then reaped).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate().expect("plinth was running")
    }

    /// SIGKILL: a crash, no clean-up of any kind.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn clients(&self) -> Clients {
        Clients::connect(&self.socket).await
    }
}

impl Drop for Plinth {
    fn drop(&mut self) {
        self.terminate();
    }
}

#[derive(Clone)]
pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Clients {
    pub async fn channel(socket: &Path) -> Channel {
        let socket = socket.to_owned();
        Endpoint::try_from("http://plinth.invalid")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
            }))
            .await
            .expect("connect to plinth")
    }

    pub async fn connect(socket: &Path) -> Self {
        let channel = Self::channel(socket).await;
        Self {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }
}

pub fn mount_cap(fs_type: &str) -> csi::VolumeCapability {
    mount_cap_with(fs_type, &[], volume_capability::access_mode::Mode::SingleNodeWriter)
}

pub fn mount_cap_with(
    fs_type: &str,
    flags: &[&str],
    mode: volume_capability::access_mode::Mode,
) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: fs_type.to_owned(),
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(volume_capability::BlockVolume {})),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn create_request(name: &str, bytes: i64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

pub fn stage_request(volume_id: &str, staging: &Path, cap: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: volume_id.to_owned(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn publish_request(
    volume_id: &str,
    staging: &Path,
    target: &Path,
    cap: csi::VolumeCapability,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub const MIB: i64 = 1 << 20;
