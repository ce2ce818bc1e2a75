//! An in-memory machine for tests that need no root: loop devices, a mount table and the
//! filesystems on images, with every call recorded and any call made to fail on demand.
//!
//! It models what the engine relies on, and nothing else: a filesystem lives on the image (so
//! it survives detach and re-attach), a mount of a blank or differently formatted device fails,
//! a bind mount of a device node shows up the way devtmpfs shows it, "not mounted" unmounts
//! succeed, and a reboot loses every attachment and mount but no data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{BindSource, FrozenFs, Host, HostError, HostResult};
use crate::model::FsType;
use crate::paths::Pinned;
use crate::sys::loopdev::{Backing, LoopDevice};
use crate::sys::mkfs::Probe;
use crate::sys::mount::MsFlags;
use crate::sys::mountinfo::{MountEntry, MountTable};
use crate::sys::statfs::FsUsage;

/// One recorded call, with the arguments that matter to the engine's decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Attach { image: PathBuf, read_only: bool, block_size: u32 },
    Detach(PathBuf),
    RefreshCapacity(PathBuf),
    MountFilesystem { device: PathBuf, target: PathBuf, fs: FsType, flags: MsFlags, data: String },
    Bind { source: PathBuf, target: PathBuf, flags: MsFlags },
    Unmount(PathBuf),
    Probe(PathBuf),
    MakeFilesystem { device: PathBuf, fs: FsType, extra: Vec<String> },
    GrowUnmountedExt4(PathBuf),
    GrowFilesystem { device: PathBuf, mount_point: PathBuf },
    Freeze(PathBuf),
    SyncFilesystem(PathBuf),
    Thaw(PathBuf),
}

/// Operations that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Attach,
    Detach,
    LoopSize,
    RefreshCapacity,
    MountTable,
    MountFilesystem,
    Bind,
    Unmount,
    Probe,
    MakeFilesystem,
    GrowUnmountedExt4,
    GrowFilesystem,
    Freeze,
    SyncFilesystem,
    Statfs,
}

#[derive(Debug, Clone)]
struct Attached {
    backing: PathBuf,
    block_size: u32,
    /// The backing file's identity, taken at attach time (as the kernel holds the inode).
    identity: Backing,
    size: u64,
}

/// What an image holds, as blkid would report it.
#[derive(Debug, Clone)]
struct Content {
    probe: Probe,
    filesystem_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    loops: BTreeMap<u32, Attached>,
    mounts: Vec<MountEntry>,
    next_mount_id: u32,
    contents: HashMap<PathBuf, Content>,
    errors: HashMap<PathBuf, u64>,
    statfs: HashMap<PathBuf, FsUsage>,
    failures: HashMap<Op, usize>,
    growth_stalls: bool,
    buffered_io: bool,
    frozen: BTreeSet<PathBuf>,
    missing_programs: BTreeSet<String>,
    calls: Vec<Call>,
}

impl State {
    /// Consumes one planned failure of `op`, if any.
    fn fails(&mut self, op: Op) -> bool {
        match self.failures.get_mut(&op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    fn backing_of(&self, device: &Path) -> Option<PathBuf> {
        let number = LoopDevice::from_path(device)?.number;
        self.loops.get(&number).map(|a| a.backing.clone())
    }

    fn mount(&mut self, entry: MountEntry) {
        self.next_mount_id += 1;
        self.mounts.push(MountEntry { mount_id: 1000 + self.next_mount_id, ..entry });
    }
}

fn injected(op: Op) -> HostError {
    HostError::Io {
        what: "injected failure of",
        path: PathBuf::from(format!("{op:?}")),
        source: std::io::Error::other("fake host"),
    }
}

fn missing(what: &'static str, path: &Path) -> HostError {
    HostError::Io { what, path: path.to_owned(), source: std::io::Error::from(std::io::ErrorKind::NotFound) }
}

fn options_of(flags: MsFlags) -> String {
    let mut options = vec![if flags.contains(MsFlags::MS_RDONLY) { "ro" } else { "rw" }];
    for (flag, name) in [(MsFlags::MS_NOSUID, "nosuid"), (MsFlags::MS_NODEV, "nodev"), (MsFlags::MS_NOEXEC, "noexec")] {
        if flags.contains(flag) {
            options.push(name);
        }
    }
    options.join(",")
}

#[derive(Debug, Clone, Default)]
pub struct FakeHost {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct FakeFrozen {
    state: Arc<Mutex<State>>,
    mount_point: PathBuf,
}

impl FrozenFs for FakeFrozen {}

impl Drop for FakeFrozen {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.frozen.remove(&self.mount_point);
        state.calls.push(Call::Thaw(self.mount_point.clone()));
    }
}

impl FakeHost {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `times` calls of `op` fail.
    pub fn fail(&self, op: Op, times: usize) {
        self.state().failures.insert(op, times);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// Shows every attachment's backing file under another path, as a plinth in a new mount
    /// namespace (a restarted pod) sees its predecessor's: `/pool/<file>` instead of the pool path.
    pub fn show_backing_from_another_namespace(&self) {
        for attached in self.state().loops.values_mut() {
            let name = attached.identity.path.file_name().unwrap_or_default().to_owned();
            attached.identity.path = Path::new("/pool").join(name);
        }
    }

    /// The image behind an attached device is deleted (the kernel keeps its inode).
    pub fn delete_backing_file(&self, image: &Path) {
        for attached in self.state().loops.values_mut().filter(|a| a.backing == image) {
            attached.identity.path = PathBuf::from(format!("{} (deleted)", attached.identity.path.display()));
        }
        let _ = std::fs::remove_file(image);
    }

    /// Loop devices now attached: (device path, backing file).
    pub fn attached(&self) -> Vec<(PathBuf, PathBuf)> {
        self.state().loops.iter().map(|(n, a)| (LoopDevice { number: *n }.path(), a.backing.clone())).collect()
    }

    pub fn mounts(&self) -> Vec<MountEntry> {
        self.state().mounts.clone()
    }

    pub fn mount_points(&self) -> Vec<PathBuf> {
        self.state().mounts.iter().map(|m| m.mount_point.clone()).collect()
    }

    pub fn frozen(&self) -> Vec<PathBuf> {
        self.state().frozen.iter().cloned().collect()
    }

    /// A process froze the filesystem at `mount_point` and died without thawing it.
    pub fn leave_frozen(&self, mount_point: &Path) {
        self.state().frozen.insert(mount_point.to_owned());
    }

    /// What a reboot does: every attachment and mount is gone, the data on images stays.
    pub fn reboot(&self) {
        let mut state = self.state();
        state.loops.clear();
        state.mounts.clear();
        state.frozen.clear();
    }

    /// Puts a signature on an image, as if someone wrote one there.
    pub fn put_content(&self, image: &Path, probe: Probe, filesystem_bytes: u64) {
        self.state().contents.insert(image.to_owned(), Content { probe, filesystem_bytes });
    }

    /// The filesystem size on an image (0 when blank).
    pub fn filesystem_bytes(&self, image: &Path) -> u64 {
        self.state().contents.get(image).map_or(0, |c| c.filesystem_bytes)
    }

    pub fn set_filesystem_errors(&self, image: &Path, count: u64) {
        self.state().errors.insert(image.to_owned(), count);
    }

    /// Growth tools report success without growing anything.
    pub fn stall_growth(&self) {
        self.state().growth_stalls = true;
    }

    /// The kernel falls back to buffered I/O on every device.
    pub fn deny_direct_io(&self) {
        self.state().buffered_io = true;
    }

    /// The node lacks `program` (as a fresh machine lacks xfsprogs).
    pub fn uninstall(&self, program: &str) {
        self.state().missing_programs.insert(program.to_owned());
    }

    pub fn set_statfs(&self, path: &Path, usage: FsUsage) {
        self.state().statfs.insert(path.to_owned(), usage);
    }

    /// Mounts something unrelated at `target` (another driver, an operator).
    pub fn mount_foreign(&self, source: &str, fs_type: &str, target: &Path) {
        self.state().mount(MountEntry {
            mount_id: 0,
            parent_id: 1,
            major: 8,
            minor: 1,
            root: "/".into(),
            mount_point: target.to_owned(),
            mount_options: "rw".into(),
            fs_type: fs_type.into(),
            source: source.into(),
            super_options: String::new(),
        });
    }
}

impl Host for FakeHost {
    fn loop_devices(&self) -> HostResult<Vec<(LoopDevice, Backing)>> {
        Ok(self.state().loops.iter().map(|(n, a)| (LoopDevice { number: *n }, a.identity.clone())).collect())
    }

    fn attach_loop(&self, image: &Path, read_only: bool, block_size: u32) -> HostResult<LoopDevice> {
        let mut state = self.state();
        state.calls.push(Call::Attach { image: image.to_owned(), read_only, block_size });
        if state.fails(Op::Attach) {
            return Err(injected(Op::Attach));
        }
        let metadata = std::fs::metadata(image).map_err(|_| missing("opening", image))?;
        use std::os::unix::fs::MetadataExt;
        let identity = Backing {
            path: image.to_owned(),
            dev: (libc::major(metadata.dev()), libc::minor(metadata.dev())),
            inode: metadata.ino(),
        };
        let number = (0..).find(|n| !state.loops.contains_key(n)).expect("a free number");
        state.loops.insert(number, Attached { backing: image.to_owned(), block_size, identity, size: metadata.len() });
        Ok(LoopDevice { number })
    }

    fn detach_loop(&self, device: LoopDevice) -> HostResult<()> {
        let mut state = self.state();
        state.calls.push(Call::Detach(device.path()));
        if state.fails(Op::Detach) {
            return Err(injected(Op::Detach));
        }
        state.loops.remove(&device.number);
        Ok(())
    }

    fn loop_size(&self, device: LoopDevice) -> HostResult<u64> {
        let mut state = self.state();
        if state.fails(Op::LoopSize) {
            return Err(injected(Op::LoopSize));
        }
        state.loops.get(&device.number).map(|a| a.size).ok_or_else(|| missing("sizing", &device.path()))
    }

    fn refresh_loop_capacity(&self, device: LoopDevice) -> HostResult<()> {
        let mut state = self.state();
        state.calls.push(Call::RefreshCapacity(device.path()));
        if state.fails(Op::RefreshCapacity) {
            return Err(injected(Op::RefreshCapacity));
        }
        let attached = state.loops.get_mut(&device.number).ok_or_else(|| missing("refreshing", &device.path()))?;
        attached.size = std::fs::metadata(&attached.backing).map(|m| m.len()).unwrap_or(attached.size);
        Ok(())
    }

    fn loop_direct_io(&self, _: LoopDevice) -> bool {
        !self.state().buffered_io
    }

    fn loop_control_available(&self) -> bool {
        true
    }

    fn mount_table(&self) -> HostResult<MountTable> {
        let mut state = self.state();
        if state.fails(Op::MountTable) {
            return Err(injected(Op::MountTable));
        }
        Ok(MountTable::from_entries(state.mounts.clone()))
    }

    fn mount_filesystem(
        &self,
        device: &Path,
        target: &Pinned,
        fs: FsType,
        flags: MsFlags,
        data: &str,
    ) -> HostResult<()> {
        let target = target.path();
        let mut state = self.state();
        state.calls.push(Call::MountFilesystem {
            device: device.to_owned(),
            target: target.to_owned(),
            fs,
            flags,
            data: data.to_owned(),
        });
        if state.fails(Op::MountFilesystem) {
            return Err(injected(Op::MountFilesystem));
        }
        if !target.is_dir() {
            return Err(missing("mounting at", target));
        }
        let image = state.backing_of(device).ok_or_else(|| missing("mounting", device))?;
        let attached_block_size =
            LoopDevice::from_path(device).and_then(|d| state.loops.get(&d.number)).map(|a| a.block_size);
        let formatted = state.contents.get(&image).is_some_and(|c| {
            // Like the kernel: a filesystem whose blocks are smaller than the device's logical
            // block does not mount.
            matches!(&c.probe, Probe::Filesystem { fs: found, block_size } if found == fs.as_str()
                && block_size.is_none_or(|bs| attached_block_size.is_none_or(|device| bs >= device)))
        });
        if !formatted {
            return Err(HostError::Io {
                what: "mounting (wrong fs type or bad superblock)",
                path: device.to_owned(),
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let number = LoopDevice::from_path(device).map_or(0, |d| d.number);
        state.mount(MountEntry {
            mount_id: 0,
            parent_id: 1,
            major: 7,
            minor: number,
            root: "/".into(),
            mount_point: target.to_owned(),
            mount_options: options_of(flags),
            fs_type: fs.as_str().into(),
            source: device.display().to_string(),
            super_options: data.to_owned(),
        });
        Ok(())
    }

    fn bind_mount(&self, source: BindSource<'_>, target: &Pinned, flags: MsFlags) -> HostResult<()> {
        let source = match source {
            BindSource::Device(device) => device,
            BindSource::Dir(dir) => dir.path(),
        };
        let target = target.path();
        let mut state = self.state();
        state.calls.push(Call::Bind { source: source.to_owned(), target: target.to_owned(), flags });
        if state.fails(Op::Bind) {
            return Err(injected(Op::Bind));
        }
        if !target.exists() {
            return Err(missing("bind-mounting at", target));
        }
        let entry = if source.starts_with("/dev") {
            // A device node: devtmpfs, with the node's name as the root of the mount.
            MountEntry {
                mount_id: 0,
                parent_id: 1,
                major: 0,
                minor: 5,
                root: Path::new("/").join(source.file_name().unwrap_or_default()),
                mount_point: target.to_owned(),
                mount_options: options_of(flags),
                fs_type: "devtmpfs".into(),
                source: "udev".into(),
                super_options: String::new(),
            }
        } else {
            let under = state.mounts.iter().rev().find(|m| m.mount_point == source).cloned();
            let under = under.ok_or_else(|| missing("bind-mounting (source is not a mount)", source))?;
            MountEntry { mount_point: target.to_owned(), mount_options: options_of(flags), ..under }
        };
        state.mount(entry);
        Ok(())
    }

    fn unmount(&self, target: &Path) -> HostResult<()> {
        let mut state = self.state();
        state.calls.push(Call::Unmount(target.to_owned()));
        if state.fails(Op::Unmount) {
            return Err(injected(Op::Unmount));
        }
        if let Some(index) = state.mounts.iter().rposition(|m| m.mount_point == target) {
            state.mounts.remove(index);
        }
        Ok(())
    }

    fn probe(&self, device: &Path, _image: &Path) -> HostResult<Probe> {
        let mut state = self.state();
        state.calls.push(Call::Probe(device.to_owned()));
        if state.fails(Op::Probe) {
            return Err(injected(Op::Probe));
        }
        let image = state.backing_of(device).ok_or_else(|| missing("probing", device))?;
        Ok(state.contents.get(&image).map_or(Probe::Blank, |c| c.probe.clone()))
    }

    fn make_filesystem(&self, device: &Path, fs: FsType, extra: &[String]) -> HostResult<()> {
        let mut state = self.state();
        state.calls.push(Call::MakeFilesystem { device: device.to_owned(), fs, extra: extra.to_vec() });
        if state.fails(Op::MakeFilesystem) {
            return Err(injected(Op::MakeFilesystem));
        }
        let number = LoopDevice::from_path(device).map(|d| d.number).ok_or_else(|| missing("formatting", device))?;
        let attached = state.loops.get(&number).cloned().ok_or_else(|| missing("formatting", device))?;
        let content = Content {
            probe: Probe::Filesystem { fs: fs.as_str().into(), block_size: Some(attached.block_size) },
            filesystem_bytes: attached.size,
        };
        state.contents.insert(attached.backing, content);
        Ok(())
    }

    fn grow_unmounted_ext4(&self, device: &Path) -> HostResult<()> {
        let mut state = self.state();
        state.calls.push(Call::GrowUnmountedExt4(device.to_owned()));
        if state.fails(Op::GrowUnmountedExt4) {
            return Err(injected(Op::GrowUnmountedExt4));
        }
        grow(&mut state, device)
    }

    fn grow_filesystem(&self, device: &Path, mount_point: &Path, _: FsType) -> HostResult<()> {
        let mut state = self.state();
        state.calls.push(Call::GrowFilesystem { device: device.to_owned(), mount_point: mount_point.to_owned() });
        if state.fails(Op::GrowFilesystem) {
            return Err(injected(Op::GrowFilesystem));
        }
        grow(&mut state, device)
    }

    fn sync_filesystem(&self, mount_point: &Path) -> HostResult<()> {
        let mut state = self.state();
        state.calls.push(Call::SyncFilesystem(mount_point.to_owned()));
        if state.fails(Op::SyncFilesystem) {
            return Err(injected(Op::SyncFilesystem));
        }
        Ok(())
    }

    fn freeze(&self, mount_point: &Path) -> HostResult<Box<dyn FrozenFs>> {
        let mut state = self.state();
        state.calls.push(Call::Freeze(mount_point.to_owned()));
        if state.fails(Op::Freeze) {
            return Err(injected(Op::Freeze));
        }
        state.frozen.insert(mount_point.to_owned());
        Ok(Box::new(FakeFrozen { state: Arc::clone(&self.state), mount_point: mount_point.to_owned() }))
    }

    fn thaw(&self, mount_point: &Path) -> HostResult<bool> {
        let mut state = self.state();
        state.calls.push(Call::Thaw(mount_point.to_owned()));
        Ok(state.frozen.remove(mount_point))
    }

    fn statfs(&self, path: &Path) -> HostResult<FsUsage> {
        let mut state = self.state();
        if state.fails(Op::Statfs) {
            return Err(injected(Op::Statfs));
        }
        if let Some(usage) = state.statfs.get(path) {
            return Ok(*usage);
        }
        let mounted = state.mounts.iter().rev().find(|m| m.mount_point == path).cloned();
        if let Some(image) = mounted.and_then(|m| state.backing_of(Path::new(&m.source))) {
            let total = state.contents.get(&image).map_or(0, |c| c.filesystem_bytes);
            return Ok(FsUsage {
                total_bytes: total,
                free_bytes: total / 2,
                available_bytes: total / 2,
                total_inodes: 1024,
                free_inodes: 1000,
            });
        }
        drop(state);
        crate::sys::statfs::usage(path).map_err(|source| HostError::Io {
            what: "statfs",
            path: path.to_owned(),
            source,
        })
    }

    fn filesystem_errors(&self, device: LoopDevice, _: FsType) -> Option<u64> {
        let state = self.state();
        let image = state.backing_of(&device.path())?;
        state.errors.get(&image).copied()
    }

    fn program_available(&self, program: &str) -> bool {
        !self.state().missing_programs.contains(program)
    }
}

fn grow(state: &mut State, device: &Path) -> HostResult<()> {
    if state.growth_stalls {
        return Ok(());
    }
    let number = LoopDevice::from_path(device).map(|d| d.number).ok_or_else(|| missing("growing", device))?;
    let attached = state.loops.get(&number).cloned().ok_or_else(|| missing("growing", device))?;
    if let Some(content) = state.contents.get_mut(&attached.backing) {
        content.filesystem_bytes = attached.size;
    }
    Ok(())
}
