//! Pool filesystems the harness makes for itself: a sparse image on this machine's disk, attached
//! with direct I/O and mounted inside the section's sandbox. Sizes are promises, not disk use,
//! so 1000 thin volumes or a 10 GiB thin image fit whatever the shared disk has free. The
//! sandbox's sweep undoes everything (it detaches the loop devices of images below it, then
//! unmounts deepest first, so volumes go before the pool that holds them).

use std::path::PathBuf;

use anyhow::Context;
use plinth_tests::Sandbox;

use crate::args;
use crate::tools::run;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// No reflinks: plinth copies with SEEK_DATA + copy_file_range.
    Ext4,
    /// reflink=1: plinth clones with FICLONE.
    XfsReflink,
}

impl PoolKind {
    pub fn name(self) -> &'static str {
        match self {
            PoolKind::Ext4 => "ext4",
            PoolKind::XfsReflink => "xfs-reflink",
        }
    }
}

/// Makes and mounts a pool filesystem of `bytes` (sparse) in the sandbox; returns its mount point.
pub fn make(sandbox: &Sandbox, kind: PoolKind, bytes: u64) -> anyhow::Result<PathBuf> {
    let image = sandbox.path().join(format!("{}-pool.img", kind.name()));
    let mount_point = sandbox.path().join(format!("{}-pool", kind.name()));
    std::fs::create_dir_all(&mount_point)?;
    run("truncate", args!["-s", bytes.to_string(), image])?;
    let (output, _) = run("losetup", args!["--direct-io=on", "--find", "--show", image])?;
    let device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match kind {
        PoolKind::Ext4 => {
            run("mkfs.ext4", args!["-q", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", device])?
        }
        PoolKind::XfsReflink => run("mkfs.xfs", args!["-q", "-K", "-m", "reflink=1", device])?,
    };
    let fs = if kind == PoolKind::Ext4 { "ext4" } else { "xfs" };
    // discard: space freed in the pool (deleted copies) is punched out of the image again, so
    // repeated copies do not fill the shared disk.
    run("mount", args!["-t", fs, "-o", "discard", device, mount_point])
        .with_context(|| format!("mounting the {} pool", kind.name()))?;
    Ok(mount_point)
}
