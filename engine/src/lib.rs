//! plinth's volume engine. Synchronous by design: callers on an async runtime run engine calls
//! on blocking threads. See ARCHITECTURE.md for the code map and invariants.

pub mod caps;
pub mod error;
pub mod failpoint;
pub mod host;
pub mod ids;
pub mod locks;
pub mod mkfsopts;
pub mod model;
pub mod mountopts;
pub mod node;
pub mod page;
pub mod paths;
pub mod pool;
pub mod size;
pub mod snapshots;
pub mod store;
pub mod support;
pub mod sys;
pub mod volumes;

#[cfg(test)]
mod proptests;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use error::{Error, Result};
pub use ids::VolumeId;

use error::Context;
use host::{Host, SystemHost};
use locks::OperationLocks;
use paths::PathPolicy;
use pool::Pool;
use store::Store;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Holds `pool/` (images), `volumes/` (records) and `staging/` (standalone staging mounts).
    pub data_dir: PathBuf,
    pub node_id: String,
    /// Roots under which staging and target paths may live.
    pub allowed_roots: Vec<PathBuf>,
    pub default_volume_size: u64,
    /// Optional ceiling on the sum of volume sizes in the pool.
    pub pool_capacity: Option<u64>,
    /// Mount options beyond the built-in allowlist that the operator permits (e.g. `suid`).
    pub allowed_mount_options: Vec<String>,
    /// Re-create publish bind mounts on start (standalone: nobody else will ask again).
    pub restore_publications: bool,
}

#[derive(Debug)]
pub struct Engine {
    /// The machine: loop devices, mounts, filesystems. The only way the engine touches them.
    host: Arc<dyn Host>,
    /// One engine per data dir: two would reconcile and clean up under each other.
    _lock: nix::fcntl::Flock<std::fs::File>,
    node_id: String,
    data_dir: PathBuf,
    pool: Pool,
    store: Store<model::VolumeRecord>,
    snapshots: Store<model::SnapshotRecord>,
    groups: Store<model::GroupSnapshotRecord>,
    locks: OperationLocks,
    paths: PathPolicy,
    default_volume_size: u64,
    allowed_mount_options: Vec<String>,
    restore_publications: bool,
    /// Bytes promised to creates and expansions still in progress (image not yet recorded).
    /// The lock covers only "check free space, then promise"; copies and preallocation run
    /// outside it, so one large clone never holds up other volumes.
    reserved: Mutex<u64>,
}

/// Takes `<data>/.lock` for this process, or refuses: another plinth serves this data dir.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let path = data_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            Error::FailedPrecondition(format!("another plinth already serves {}", data_dir.display()))
        } else {
            Error::internal(format!("locking {}", path.display()), errno)
        }
    })
}

/// Space promised to one in-progress create or expansion; released on drop (by then the
/// volume's record accounts for it, or the operation failed).
pub(crate) struct Reservation<'a> {
    reserved: &'a Mutex<u64>,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        *reserved = reserved.saturating_sub(self.bytes);
    }
}

impl Engine {
    /// Promises `bytes` of the pool, or RESOURCE_EXHAUSTED with `what` explaining the need.
    pub(crate) fn reserve(&self, bytes: u64, what: impl FnOnce() -> String) -> Result<Reservation<'_>> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let capacity = self.pool_capacity()?;
        let available = capacity.available_bytes.saturating_sub(*reserved);
        if bytes > available {
            return Err(Error::ResourceExhausted(format!(
                "pool has {available} bytes available, {} needs {bytes}",
                what()
            )));
        }
        *reserved += bytes;
        Ok(Reservation { reserved: &self.reserved, bytes })
    }

    /// Attaches an image. Every attach and detach goes through here or [`Self::detach_loop`]:
    /// what a loop device writes or discards changes its image's allocation behind the pool's
    /// back, so the pool forgets what it knew of images at rest.
    pub(crate) fn attach_loop(
        &self,
        image: &std::path::Path,
        read_only: bool,
        block_size: u32,
    ) -> host::HostResult<sys::loopdev::LoopDevice> {
        self.pool.forget_allocations();
        self.host.attach_loop(image, read_only, block_size)
    }

    /// Detaches a loop device (see [`Self::attach_loop`]).
    pub(crate) fn detach_loop(&self, device: sys::loopdev::LoopDevice) -> host::HostResult<()> {
        let detached = self.host.detach_loop(device);
        self.pool.forget_allocations();
        detached
    }

    /// The pool's capacity figures, from its records and its filesystem's free space.
    pub(crate) fn pool_capacity(&self) -> Result<pool::Capacity> {
        let usage = self
            .host
            .statfs(self.pool.dir())
            .map_err(|e| Error::internal(format!("statfs {}", self.pool.dir().display()), e))?;
        self.store.with_ready(|ready| {
            self.pool.capacity(
                ready.map(|r| pool::Promise { id: &r.id, size: r.capacity_bytes, staged: r.staged.is_some() }),
                usage,
            )
        })
    }

    /// Reports a failure of work that wrote into the pool as RESOURCE_EXHAUSTED when the pool's
    /// filesystem has run out of space (something outside plinth filled it: plinth's own
    /// accounting never promises more than it has), so the CO sees "full", not "broken".
    pub(crate) fn pool_full_or(&self, err: Error) -> Error {
        /// Less than this left counts as full (filesystems keep a little back for themselves).
        const FULL_BELOW: u64 = 8 << 20;
        if !matches!(err, Error::Internal { .. }) {
            return err;
        }
        match self.host.statfs(self.pool.dir()) {
            Ok(usage) if usage.available_bytes < FULL_BELOW => Error::ResourceExhausted(format!(
                "the pool filesystem ({}) is full, {} bytes left: {}",
                self.pool.dir().display(),
                usage.available_bytes,
                err.chain()
            )),
            _ => err,
        }
    }

    /// An engine on this machine.
    pub fn open(config: EngineConfig) -> Result<Self> {
        Self::open_with_host(config, Arc::new(SystemHost))
    }

    /// An engine on the given host (tests use `host::fake::FakeHost`).
    pub fn open_with_host(config: EngineConfig, host: Arc<dyn Host>) -> Result<Self> {
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir).context(|| format!("creating data dir {}", data_dir.display()))?;
        // Before anything touches the pool: opening it sweeps partial files of crashed copies.
        let lock = lock_data_dir(&data_dir)?;
        let pool = Pool::open(data_dir.join("pool"), config.pool_capacity)
            .context(|| format!("opening pool in {}", data_dir.display()))?;
        let store =
            Store::open(data_dir.join("volumes")).context(|| format!("opening records in {}", data_dir.display()))?;
        let snapshots = Store::open(data_dir.join("snapshots"))
            .context(|| format!("opening snapshot records in {}", data_dir.display()))?;
        let groups = Store::open(data_dir.join("group-snapshots"))
            .context(|| format!("opening group snapshot records in {}", data_dir.display()))?;
        let paths = PathPolicy::new(config.allowed_roots.iter().cloned())
            .context(|| format!("preparing allowed roots {:?}", config.allowed_roots))?;
        let engine = Self {
            host,
            _lock: lock,
            node_id: config.node_id,
            data_dir,
            pool,
            store,
            snapshots,
            groups,
            locks: OperationLocks::default(),
            paths,
            default_volume_size: config.default_volume_size,
            allowed_mount_options: config.allowed_mount_options,
            restore_publications: config.restore_publications,
            reserved: Mutex::new(0),
        };
        engine.finish_interrupted()?;
        Ok(engine)
    }

    /// Finishes what a crash interrupted, before anything else runs: intents of creations are
    /// undone (nobody was told they succeeded), intents of deletions are completed.
    fn finish_interrupted(&self) -> Result<()> {
        for group in self.groups.list_any()?.into_iter().filter(|g| !g.phase.is_ready()) {
            tracing::info!(group_snapshot_id = %group.id, phase = ?group.phase, "finishing an interrupted group snapshot");
            self.undo_group(&group)?;
        }
        for snapshot in self.snapshots.list_any()?.into_iter().filter(|s| !s.phase.is_ready()) {
            tracing::info!(snapshot_id = %snapshot.id, phase = ?snapshot.phase, "finishing an interrupted snapshot");
            self.undo_snapshot(&snapshot.id)?;
        }
        for volume in self.store.list_any()?.into_iter().filter(|v| !v.phase.is_ready()) {
            tracing::info!(volume_id = %volume.id, phase = ?volume.phase, "finishing an interrupted volume operation");
            self.undo_volume(&volume.id)?;
        }
        Ok(())
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn pool_dir(&self) -> &std::path::Path {
        self.pool.dir()
    }

    pub fn allowed_roots(&self) -> &[PathBuf] {
        self.paths.roots()
    }

    /// Bytes the volume's image occupies in the pool.
    pub fn allocated_bytes(&self, id: &VolumeId) -> u64 {
        self.pool.allocated_bytes(id)
    }

    /// Every volume record on this node.
    pub fn volumes(&self) -> Result<Vec<model::VolumeRecord>> {
        self.store.list()
    }

    /// Ready when the pool takes new files and, for node duty, loop devices can be attached.
    pub fn probe(&self, node_duty: bool) -> Result<()> {
        if !self.pool.writable() {
            return Err(Error::FailedPrecondition(format!("pool {} is not writable", self.pool.dir().display())));
        }
        if node_duty && !self.host.loop_control_available() {
            return Err(Error::FailedPrecondition(
                "/dev/loop-control cannot be opened: loop devices unavailable".into(),
            ));
        }
        Ok(())
    }
}
