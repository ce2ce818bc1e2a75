//! Cluster mode. The controller turns claims of plinth's StorageClasses into `Volume` objects and
//! PersistentVolumes bound to those claims; each node's agent makes the images its node holds and
//! publishes the node's free capacity. See ARCHITECTURE.md.

pub mod agent;
pub mod capacity;
pub mod crd;
pub mod csi_controller;
pub mod leader;
pub mod provisioner;
pub mod volumes;

/// Errors of the reconcilers. The runtime hands them to the controller's `error_policy`, which
/// logs them and requeues the object after a fixed delay.
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
}
