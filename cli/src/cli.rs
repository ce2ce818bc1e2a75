//! Command-line surface.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/plinth";
pub const SOCKET_NAME: &str = "csi.sock";

#[derive(Debug, Parser)]
#[command(name = "plinth", version, about = "plinth: local-storage CSI driver (plinth.csi.dev)")]
pub struct Args {
    /// CSI endpoint, e.g. unix:///var/lib/plinth/csi.sock (servers default to <data-dir>/csi.sock).
    #[arg(long, global = true, env = "PLINTH_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Output of client verbs.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Log filter (tracing-subscriber syntax), e.g. info or plinth_engine=debug. Env: PLINTH_LOG.
    #[arg(long, global = true, env = "PLINTH_LOG")]
    pub log_level: Option<String>,
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

impl Args {
    pub fn endpoint_or_default(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| format!("unix://{DEFAULT_DATA_DIR}/{SOCKET_NAME}"))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve CSI Identity + Controller.
    Controller(ServerOpts),
    /// Serve CSI Identity + Node (the per-node plugin).
    Node(ServerOpts),
    /// Serve everything in one process on this machine, no Kubernetes needed.
    Standalone(ServerOpts),
    /// Manage volumes through a running plinth.
    #[command(subcommand)]
    Volume(VolumeVerb),
    /// Manage snapshots through a running plinth.
    #[command(subcommand)]
    Snapshot(SnapshotVerb),
    /// Pool capacity, volumes, and where they are mounted.
    Status,
}

impl Command {
    pub fn is_server(&self) -> bool {
        matches!(self, Command::Controller(_) | Command::Node(_) | Command::Standalone(_))
    }
}

#[derive(Debug, Clone, ClapArgs)]
pub struct ServerOpts {
    /// Pool images, volume records and standalone staging mounts live here.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// This node's ID (default: the hostname).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Staging/target paths must be inside one of these (repeatable). Default: /var/lib/kubelet;
    /// standalone also allows /mnt.
    #[arg(long = "allowed-root")]
    pub allowed_roots: Vec<PathBuf>,
    /// Reported to the CO in NodeGetInfo (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_volumes_per_node: i64,
    /// Size of a volume created without a capacity range.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub default_volume_size: u64,
    /// Ceiling on the sum of volume sizes in the pool (default: the pool filesystem's free space).
    #[arg(long, value_parser = parse_size)]
    pub pool_capacity: Option<u64>,
    /// Permit a mount option beyond the built-in allowlist (repeatable), e.g. suid or dev.
    #[arg(long = "allow-mount-option")]
    pub allowed_mount_options: Vec<String>,
    /// Register with the kubelet whose root directory this is (node mode), through
    /// <kubelet-dir>/plugins_registry/, e.g. /var/lib/kubelet.
    #[arg(long)]
    pub kubelet_dir: Option<PathBuf>,
    /// Kubernetes access (cluster mode): this kubeconfig, or the in-cluster service account
    /// when running in a pod. Without either, plinth runs without Kubernetes.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace for plinth's own objects (leader Lease, CSIStorageCapacity).
    #[arg(long, env = "POD_NAMESPACE", default_value = "plinth-system")]
    pub namespace: String,
    /// Controller: act only while holding the leader Lease (run two replicas for failover).
    #[arg(long)]
    pub leader_elect: bool,
    /// Controller: how long a leader's Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Controller: this replica's identity in the Lease (default: pod name, else hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Serve /healthz, /readyz and /metrics on this address (e.g. 0.0.0.0:9808).
    #[arg(long)]
    pub http_address: Option<std::net::SocketAddr>,
}

fn parse_size(text: &str) -> Result<u64, String> {
    plinth_engine::size::parse_size(text)
}

#[derive(Debug, Subcommand)]
pub enum VolumeVerb {
    /// Create a volume.
    Create {
        name: String,
        /// e.g. 1GiB, 512Mi, 10G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Filesystem (default ext4).
        #[arg(long, value_parser = ["ext4", "xfs", "btrfs"], conflicts_with = "block")]
        fs: Option<String>,
        /// A raw block device instead of a filesystem.
        #[arg(long)]
        block: bool,
        /// Preallocate the whole size now.
        #[arg(long)]
        thick: bool,
        /// Restore this snapshot into the new volume (its layout is the snapshot's).
        #[arg(long, conflicts_with_all = ["from_volume", "fs", "block"])]
        from_snapshot: Option<String>,
        /// Clone this volume into the new one (its layout is the source's).
        #[arg(long, conflicts_with_all = ["fs", "block"])]
        from_volume: Option<String>,
    },
    /// Grow a volume to SIZE (and its filesystem, if it is mounted).
    Expand {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// List volumes.
    List,
    /// Stage and publish a volume at PATH (a directory; for block volumes, a device file).
    Mount {
        name: String,
        path: PathBuf,
        #[arg(long)]
        read_only: bool,
    },
    /// Unpublish the volume mounted at PATH and unstage it when nothing else uses it.
    Unmount { path: PathBuf },
    /// Delete a volume (it must not be mounted).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotVerb {
    /// Take a snapshot of a volume (a mounted one is frozen for the copy).
    Create {
        name: String,
        /// The volume to snapshot.
        #[arg(long)]
        volume: String,
    },
    /// List snapshots.
    List,
    /// Delete a snapshot.
    Delete { name: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The args deploy/ gives the containers must be ones this binary accepts.
    #[test]
    fn deploy_manifests_use_real_flags() {
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        for file in ["controller.yaml", "node.yaml"] {
            let text = std::fs::read_to_string(deploy.join(file)).unwrap();
            let manifest: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            let containers = manifest["spec"]["template"]["spec"]["containers"].as_sequence().unwrap();
            for container in containers {
                let args: Vec<String> =
                    container["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
                let parsed = Args::try_parse_from(std::iter::once("plinth".to_owned()).chain(args.clone()));
                assert!(parsed.is_ok(), "{file}: {args:?}: {}", parsed.unwrap_err());
            }
        }
    }
}
