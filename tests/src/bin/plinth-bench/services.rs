//! Data services through the CLI verbs a standalone user has: `plinth snapshot create`,
//! `plinth volume create --from-volume` (clone) and `--from-snapshot` (restore), of a mounted
//! volume holding real data in a larger thin image — against `cp` of the same image on the same
//! pool: `--sparse=always` on a copying (ext4) pool, `--reflink=always` on an xfs reflink pool.
//!
//! Every copy starts with the source's pages out of the guest's page cache, and plinth's copy is
//! durable (fsync before its record), so the baseline is timed with and without an fsync of the
//! copy. Each operation has its own baseline, the two in alternating order. The VM host caches
//! the disk as well, beyond the harness's reach, and a second copy of the same source is faster:
//! so each pair starts with an unmeasured read of the source, and both sides find it in the
//! host's cache. (Without it, whichever side went first paid the host's cold read alone; with an
//! odd number of repetitions that was plinth's snapshot twice in three, and its median too.)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use plinth_tests::{Plinth, Sandbox};
use serde::Serialize;

use crate::args;
use crate::fio::{self, Setup};
use crate::poolfs::{self, PoolKind};
use crate::stats::{Latency, ms};
use crate::tools::run;

const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize)]
pub struct Operation {
    /// "snapshot", "clone" or "restore".
    pub operation: &'static str,
    /// Wall time of the CLI verb, process start to exit.
    pub plinth: Latency,
    /// `cp` of the same image, alone and followed by an fsync of the copy.
    pub cp: Latency,
    pub cp_fsync: Latency,
}

impl Operation {
    /// plinth / (cp + fsync) of each repetition, whose two sides ran back to back: on a disk
    /// whose speed drifts by 3× within a run, a pair shares the drift that medians apart do not.
    pub fn pair_ratios(&self) -> Vec<f64> {
        self.plinth.samples_ms.iter().zip(&self.cp_fsync.samples_ms).map(|(plinth, cp)| plinth / cp).collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Services {
    pub pool: &'static str,
    pub cp_flag: &'static str,
    pub image_bytes: u64,
    pub data_bytes: u64,
    pub repetitions: usize,
    pub copy_method: String,
    pub operations: Vec<Operation>,
}

pub struct Plan {
    pub image_bytes: u64,
    pub data_bytes: u64,
    pub repetitions: usize,
}

/// Runs the CLI against `plinth`'s socket with JSON output; the parsed output and the wall time.
fn cli(socket: &Path, verb: &[&str]) -> anyhow::Result<(serde_json::Value, Duration)> {
    let endpoint = format!("unix://{}", socket.display());
    let mut arguments: Vec<&std::ffi::OsStr> =
        vec!["--endpoint".as_ref(), endpoint.as_ref(), "--output".as_ref(), "json".as_ref()];
    arguments.extend(verb.iter().map(|a| std::ffi::OsStr::new(*a)));
    let program = plinth_tests::plinth_bin();
    let (output, elapsed) = run(&program.to_string_lossy(), &arguments)?;
    let value = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    Ok((value, elapsed))
}

/// Writes back and drops `file`'s cached pages, so the next copy reads it from disk.
fn evict(file: &Path) -> anyhow::Result<()> {
    let handle = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    handle.sync_all()?;
    nix::fcntl::posix_fadvise(&handle, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)?;
    Ok(())
}

/// Reads every data extent of `file` once (holes are skipped, as both copies skip them), so the
/// VM host holds it in its cache before either side of a pair copies it.
fn prime(file: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let handle = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let len = handle.metadata()?.len();
    let mut buffer = vec![0u8; 1 << 20];
    plinth_engine::sys::copy::for_each_data_extent(&handle, len, |mut at, end| {
        while at < end {
            let want = ((end - at) as usize).min(buffer.len());
            match handle.read_at(&mut buffer[..want], at)? {
                0 => break,
                read => at += read as u64,
            }
        }
        Ok(())
    })
    .with_context(|| format!("reading {}", file.display()))
}

/// Flushes the pool filesystem, so no earlier step's writeback runs during the next measurement.
fn settle(pool: &Path) -> anyhow::Result<()> {
    let handle = std::fs::File::open(pool)?;
    nix::unistd::syncfs(&handle)?;
    Ok(())
}

/// `cp FLAG from to`, then fsync of the copy; both durations. The copy is removed.
fn baseline(flag: &str, from: &Path, to: &Path) -> anyhow::Result<(Duration, Duration)> {
    evict(from)?;
    let started = Instant::now();
    run("cp", args![flag, from, to])?;
    let copied = started.elapsed();
    std::fs::File::open(to)?.sync_all()?;
    let synced = started.elapsed();
    std::fs::remove_file(to)?;
    Ok((copied, synced))
}

/// One plinth operation and `cp` of the same source, in the order of the repetition, each after
/// the pool has settled and with the source out of the guest's page cache.
struct AgainstCp<'a> {
    plinth_first: bool,
    pool: &'a Path,
    cp_flag: &'a str,
    copy: &'a Path,
}

impl AgainstCp<'_> {
    /// Appends plinth's time, cp's and cp + fsync's to `times`.
    fn run(
        &self,
        times: &mut [Vec<f64>; 3],
        source: &Path,
        mut plinth: impl FnMut() -> anyhow::Result<Duration>,
    ) -> anyhow::Result<()> {
        prime(source)?;
        for plinth_turn in [self.plinth_first, !self.plinth_first] {
            settle(self.pool)?;
            if plinth_turn {
                evict(source)?;
                times[0].push(ms(plinth()?));
            } else {
                let (copied, synced) = baseline(self.cp_flag, source, self.copy)?;
                times[1].push(ms(copied));
                times[2].push(ms(synced));
            }
        }
        Ok(())
    }
}

fn image_of(pool_dir: &Path, id: &str) -> PathBuf {
    pool_dir.join(format!("{id}.img"))
}

/// Source volume with `data_bytes` written, mounted; returns its image path.
fn prepare_source(socket: &Path, root: &Path, pool_dir: &Path, plan: &Plan) -> anyhow::Result<PathBuf> {
    let (created, _) = cli(socket, &["volume", "create", "source", "--size", &plan.image_bytes.to_string()])?;
    let id = created["id"].as_str().context("volume create printed no id")?.to_owned();
    let mount = root.join("source");
    cli(socket, &["volume", "mount", "source", &mount.to_string_lossy()])?;
    let setup = Setup { file_bytes: plan.data_bytes, runtime_s: 0, ramp_s: 0 };
    fio::prefill(&mount.join("data"), &setup)?;
    Ok(image_of(pool_dir, &id))
}

pub async fn services(kind: PoolKind, plan: &Plan, sandbox: Sandbox) -> anyhow::Result<Services> {
    let pool = poolfs::make(&sandbox, kind, 4 * plan.image_bytes + 4 * GIB)?;
    let data_dir = pool.join("data");
    let plinth = Plinth::start_at(&sandbox.socket(), &sandbox.root(), "standalone", &data_dir, &[], true);
    let (socket, root) = (sandbox.socket(), sandbox.root());
    let pool_dir = data_dir.join("pool");
    let snapshot_dir = pool_dir.join("snapshots");
    let cp_flag = if kind == PoolKind::Ext4 { "--sparse=always" } else { "--reflink=always" };
    let size = plan.image_bytes.to_string();
    let plan_data = plan.data_bytes;
    let repetitions = plan.repetitions;
    let image_bytes = plan.image_bytes;
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<(String, Vec<Operation>)> {
        let plan = Plan { image_bytes, data_bytes: plan_data, repetitions };
        let source = prepare_source(&socket, &root, &pool_dir, &plan)?;
        let copy = pool.join("cp-copy.img");
        let mut times: [[Vec<f64>; 3]; 3] = Default::default();
        let mut copy_method = String::new();
        for rep in 0..repetitions {
            let plinth_first = rep % 2 == 0;
            let snapshot = format!("snapshot-{rep}");
            let against_cp = AgainstCp { plinth_first, pool: &pool, cp_flag, copy: &copy };
            // Snapshot against cp of the source image.
            against_cp.run(&mut times[0], &source, || {
                let (taken, elapsed) = cli(&socket, &["snapshot", "create", &snapshot, "--volume", "source"])?;
                copy_method = taken["copy_method"].as_str().unwrap_or_default().to_owned();
                Ok(elapsed)
            })?;
            // The clone gets its own baseline, in alternating order too: whichever of two copies
            // of the source runs second finds it in the VM host's cache.
            let clone = format!("clone-{rep}");
            against_cp.run(&mut times[1], &source, || {
                let (_, elapsed) =
                    cli(&socket, &["volume", "create", &clone, "--size", &size, "--from-volume", "source"])?;
                cli(&socket, &["volume", "delete", &clone])?;
                Ok(elapsed)
            })?;
            // Restore against cp of the snapshot image.
            let snapshot_image = std::fs::read_dir(&snapshot_dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|e| e == "img"))
                .context("the snapshot image is missing")?;
            let restore = format!("restore-{rep}");
            against_cp.run(&mut times[2], &snapshot_image, || {
                let (_, elapsed) =
                    cli(&socket, &["volume", "create", &restore, "--size", &size, "--from-snapshot", &snapshot])?;
                cli(&socket, &["volume", "delete", &restore])?;
                Ok(elapsed)
            })?;
            cli(&socket, &["snapshot", "delete", &snapshot])?;
        }
        let operations = ["snapshot", "clone", "restore"]
            .into_iter()
            .zip(times)
            .map(|(operation, [plinth, cp, cp_fsync])| Operation {
                operation,
                plinth: Latency::of(plinth),
                cp: Latency::of(cp),
                cp_fsync: Latency::of(cp_fsync),
            })
            .collect();
        Ok((copy_method, operations))
    })
    .await?;
    let (copy_method, operations) = result?;
    if copy_method.is_empty() {
        bail!("plinth reported no copy method for its snapshots");
    }
    drop(plinth);
    for op in &operations {
        eprintln!(
            "  {:<8} plinth p50 {:>8.1} ms   cp {:>8.1} ms   cp+fsync {:>8.1} ms",
            op.operation, op.plinth.p50_ms, op.cp.p50_ms, op.cp_fsync.p50_ms
        );
    }
    Ok(Services {
        pool: kind.name(),
        cp_flag,
        image_bytes: plan.image_bytes,
        data_bytes: plan.data_bytes,
        repetitions: plan.repetitions,
        copy_method,
        operations,
    })
}
