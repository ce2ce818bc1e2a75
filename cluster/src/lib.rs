//! Cluster mode. The controller turns claims of plinth's StorageClasses into `Volume` objects and
//! PersistentVolumes bound to those claims (restored or cloned where the source lives, modified
//! when their VolumeAttributesClass changes), and VolumeSnapshotContents into `Snapshot` objects;
//! each node's agent makes the images and snapshots its node holds and publishes the node's free
//! capacity. See ARCHITECTURE.md.

pub mod agent;
pub mod agent_snapshots;
pub mod api_client;
pub mod backoff;
pub mod cache;
pub mod capacity;
pub mod crd;
pub mod csi_controller;
pub mod csi_snapshots;
pub mod data_source;
pub mod event_queue;
pub mod group_contents;
pub mod leader;
pub mod modify;
pub mod provisioner;
pub mod snapshot_api;
pub mod snapshot_contents;
pub mod snapshots;
pub mod volumes;

/// Errors of the reconcilers. The runtime hands them to the controller's `error_policy`, which
/// logs them and requeues the object with a per-object exponential backoff (`backoff`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Engine(#[from] plinth_engine::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("worker: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The image cannot go yet: it is staged or published on its node.
    #[error("still in use on its node: {0}")]
    InUse(String),
    /// The image finalizer could not be added or removed, or the work inside it failed.
    #[error(transparent)]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    /// Nothing failed: the object waits for something outside it (a data source to become
    /// ready, a class to appear). Retried with the same backoff; logged as progress.
    #[error("waiting for {0}")]
    Waiting(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the leader runs, until shutdown: claims and reclaim (`provisioner`), and — once the
/// cluster serves the snapshot CRDs, which are optional — the (group) snapshot contents.
pub async fn run_controller(ctx: std::sync::Arc<provisioner::Context>) {
    let snapshots = async {
        snapshot_api::until_served(&ctx.client, "snapshot.storage.k8s.io/v1", "volumesnapshotcontents").await;
        snapshot_contents::run(std::sync::Arc::clone(&ctx)).await;
    };
    let groups = async {
        snapshot_api::until_served(&ctx.client, "groupsnapshot.storage.k8s.io/v1", "volumegroupsnapshotcontents").await;
        group_contents::run(std::sync::Arc::clone(&ctx)).await;
    };
    futures::join!(provisioner::run(std::sync::Arc::clone(&ctx)), snapshots, groups);
}

/// Labels, annotations and finalizers plinth puts on objects.
pub mod keys {
    /// On a Volume: the node whose pool holds it (for the agent's label selector).
    pub const NODE_LABEL: &str = "plinth.csi.dev/node";
    /// On a Volume: the CSI volume ID its node gives it (lookups by ID, e.g. DeleteVolume).
    pub const VOLUME_ID_LABEL: &str = "plinth.csi.dev/volume-id";
    /// Finalizer on a Volume: the agent removes it once the image is gone.
    pub const IMAGE_FINALIZER: &str = "plinth.csi.dev/image";
    /// Annotation on PVs plinth provisioned (the convention external-provisioner uses too).
    pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
    /// Set on a claim by the scheduler for WaitForFirstConsumer classes.
    pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
    /// On CSIStorageCapacity objects: the StorageClass they describe.
    pub const STORAGE_CLASS_LABEL: &str = "plinth.csi.dev/storageclass";
    /// On a Snapshot: the CSI snapshot ID its node gives it (lookups by handle).
    pub const SNAPSHOT_ID_LABEL: &str = "plinth.csi.dev/snapshot-id";
    /// On a GroupSnapshot: its CSI group snapshot ID.
    pub const GROUP_SNAPSHOT_ID_LABEL: &str = "plinth.csi.dev/group-snapshot-id";
    /// On a Snapshot or GroupSnapshot plinth's own reconcilers made: the (group) snapshot content
    /// that asked for it, so that content is reconciled again when the agent reports.
    pub const REQUESTED_BY_LABEL: &str = "plinth.csi.dev/requested-by";
}
