//! The baseline control path: what a shell script (or a hostpath-style driver shelling out)
//! does for one volume's life — truncate, losetup --direct-io, blkid, mkfs with plinth's flags,
//! mount, bind mount, umount ×2, losetup -d, rm — run by the harness itself, step by step, so
//! each step can be set against the plinth RPC that does the same job.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::args;
use crate::kind::Kind;
use crate::tools::{run, run_with_codes};

/// The six lifecycle steps, named after the plinth RPC that does each job.
pub const STEPS: [&str; 6] = [
    "CreateVolume",
    "NodeStageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeUnstageVolume",
    "DeleteVolume",
];

/// Where one raw volume lives.
pub struct RawVolume {
    pub image: PathBuf,
    pub staging: PathBuf,
    pub target: PathBuf,
}

/// One full raw cycle; the duration of each of [`STEPS`].
pub fn cycle(kind: Kind, volume: &RawVolume, size: u64) -> anyhow::Result<[Duration; 6]> {
    let mut times = [Duration::ZERO; 6];
    let timed = |slot: &mut Duration, step: &mut dyn FnMut() -> anyhow::Result<()>| {
        let started = Instant::now();
        step()?;
        *slot = started.elapsed();
        anyhow::Ok(())
    };
    let size_arg = size.to_string();
    timed(&mut times[0], &mut || {
        run("truncate", args!["-s", size_arg, volume.image])?;
        Ok(())
    })?;
    let mut device = PathBuf::new();
    timed(&mut times[1], &mut || {
        device = stage(kind, volume)?;
        Ok(())
    })?;
    timed(&mut times[2], &mut || publish(kind, volume, &device))?;
    timed(&mut times[3], &mut || {
        run("umount", args![volume.target])?;
        remove_target(&volume.target)
    })?;
    timed(&mut times[4], &mut || {
        if kind.fs().is_some() {
            run("umount", args![volume.staging])?;
        }
        run("losetup", args!["-d", device])?;
        Ok(())
    })?;
    timed(&mut times[5], &mut || {
        run("rm", args![volume.image])?;
        Ok(())
    })?;
    Ok(times)
}

fn stage(kind: Kind, volume: &RawVolume) -> anyhow::Result<PathBuf> {
    // The same geometry plinth gives its devices: 4096-byte logical blocks, direct I/O.
    let (output, _) =
        run("losetup", args!["--direct-io=on", "--sector-size", "4096", "--find", "--show", volume.image])?;
    let device = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let (Some(fs), Some((mkfs, flags))) = (kind.fs(), kind.mkfs()) else { return Ok(device) };
    // Look before formatting, as plinth does: exit 2 is blkid's "nothing found".
    let (probe, _) = run_with_codes("blkid", args!["-p", "-o", "export", device], &[0, 2])?;
    if probe.status.code() == Some(0) {
        bail!("{} is not blank: {}", device.display(), String::from_utf8_lossy(&probe.stdout).trim());
    }
    let mut mkfs_args: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_ref()).collect();
    mkfs_args.push(device.as_os_str());
    run(mkfs, &mkfs_args)?;
    run("mount", args!["-t", fs, "-o", kind.mount_options(), device, volume.staging])?;
    Ok(device)
}

fn publish(kind: Kind, volume: &RawVolume, device: &Path) -> anyhow::Result<()> {
    match kind {
        Kind::Block => {
            std::fs::File::create(&volume.target).with_context(|| format!("creating {}", volume.target.display()))?;
            run("mount", args!["--bind", device, volume.target])?;
        }
        _ => {
            std::fs::create_dir(&volume.target).with_context(|| format!("creating {}", volume.target.display()))?;
            // util-linux applies -o to a bind mount with the remount it needs, like plinth.
            run("mount", args!["--bind", "-o", "nosuid,nodev", volume.staging, volume.target])?;
        }
    }
    Ok(())
}

fn remove_target(target: &Path) -> anyhow::Result<()> {
    let removed = if target.is_dir() { std::fs::remove_dir(target) } else { std::fs::remove_file(target) };
    removed.with_context(|| format!("removing {}", target.display()))
}
