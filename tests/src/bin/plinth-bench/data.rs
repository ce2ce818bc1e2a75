//! Data path: the same fio job inside a published plinth volume and on the pool's own filesystem,
//! runs alternating between the two (ABBA order), median of each side. This VM's I/O drifts
//! by tens of percent within minutes; alternating puts the drift on both sides equally.
//!
//! A third side, a published raw block volume (the loop device itself, no filesystem inside),
//! splits what the filesystem volume loses between the loop device and the filesystem in it.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use plinth_proto::csi_v1 as csi;
use plinth_tests::{Clients, Sandbox};
use serde::Serialize;

use crate::fio::{self, Job, Setup};
use crate::stats::median;

#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    pub job: Job,
    pub unit: &'static str,
    pub plinth: Vec<f64>,
    pub pool: Vec<f64>,
    pub plinth_median: f64,
    pub pool_median: f64,
    /// plinth median / pool median.
    pub ratio: f64,
    /// plinth / pool of each back-to-back pair: their spread shows the noise.
    pub pair_ratios: Vec<f64>,
    /// The same job on a published raw block volume, when measured.
    pub block: Vec<f64>,
    pub block_median: Option<f64>,
    /// block median / pool median.
    pub block_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataPath {
    pub setup: Setup,
    pub runs: usize,
    pub loop_device: String,
    pub direct_io: bool,
    /// The loop device's queue settings during the runs.
    pub queue: BTreeMap<String, String>,
    pub jobs: Vec<JobResult>,
}

/// The files fio works on: inside the published volume, beside the pool on its filesystem, and
/// the published block volume.
pub struct Targets {
    pub volume_file: PathBuf,
    pub pool_file: PathBuf,
    pub block_file: PathBuf,
    pub device: plinth_engine::sys::loopdev::LoopDevice,
}

/// Where fio runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Volume,
    Block,
    Pool,
}

impl Targets {
    fn file(&self, side: Side) -> &Path {
        match side {
            Side::Volume => &self.volume_file,
            Side::Block => &self.block_file,
            Side::Pool => &self.pool_file,
        }
    }
}

/// Queue attributes the loop knobs are about (sysfs `queue/`), as they are now.
pub const QUEUE_KNOBS: [&str; 9] = [
    "scheduler",
    "nr_requests",
    "max_sectors_kb",
    "read_ahead_kb",
    "nomerges",
    "iostats",
    "rq_affinity",
    "wbt_lat_usec",
    "rotational",
];

pub fn queue_settings(device: plinth_engine::sys::loopdev::LoopDevice) -> BTreeMap<String, String> {
    QUEUE_KNOBS
        .iter()
        .map(|knob| {
            let path = format!("/sys/block/loop{}/queue/{knob}", device.number);
            (knob.to_string(), std::fs::read_to_string(path).unwrap_or_default().trim().to_owned())
        })
        .collect()
}

/// The loop device plinth attached `image` to.
pub fn device_of(image: &Path) -> anyhow::Result<plinth_engine::sys::loopdev::LoopDevice> {
    let metadata = std::fs::metadata(image).with_context(|| format!("inspecting {}", image.display()))?;
    plinth_engine::sys::loopdev::attached_devices()?
        .into_iter()
        .find(|(_, backing)| backing.is(&metadata))
        .map(|(device, _)| device)
        .with_context(|| format!("no loop device holds {}", image.display()))
}

/// Creates, stages and publishes an ext4 volume and a raw block volume for fio, and a directory on
/// the pool's filesystem for the baseline; lays out the three test files.
pub async fn prepare(clients: &mut Clients, sandbox: &Sandbox, setup: &Setup) -> anyhow::Result<Targets> {
    // Room for the file plus ext4's own metadata.
    let target =
        publish(clients, sandbox, "fio", plinth_tests::mount_cap("ext4"), setup.file_bytes + (512 << 20)).await?;
    let block_file = publish(clients, sandbox, "fio-block", plinth_tests::block_cap(), setup.file_bytes).await?;
    let pool = sandbox.data_dir().join("pool");
    let baseline = sandbox.path().join("pool-filesystem");
    std::fs::create_dir_all(&baseline)?;
    if std::fs::metadata(&pool)?.dev() != std::fs::metadata(&baseline)?.dev() {
        bail!("{} is not on the pool's filesystem", baseline.display());
    }
    let id = plinth_engine::VolumeId::for_name("fio");
    let device = device_of(&pool.join(format!("{id}.img")))?;
    let targets =
        Targets { volume_file: target.join("fio.dat"), pool_file: baseline.join("fio.dat"), block_file, device };
    let setup = *setup;
    let files = [targets.volume_file.clone(), targets.block_file.clone(), targets.pool_file.clone()];
    tokio::task::spawn_blocking(move || files.iter().try_for_each(|file| fio::prefill(file, &setup))).await??;
    Ok(targets)
}

/// Creates, stages and publishes one volume; its target path.
async fn publish(
    clients: &mut Clients,
    sandbox: &Sandbox,
    name: &str,
    cap: csi::VolumeCapability,
    bytes: u64,
) -> anyhow::Result<PathBuf> {
    let volume = clients
        .controller
        .create_volume(plinth_tests::create_request(name, bytes as i64, cap.clone()))
        .await
        .with_context(|| format!("creating the {name} volume"))?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    let (staging, target) =
        (sandbox.root().join(format!("{name}-staging")), sandbox.root().join(format!("{name}-target")));
    std::fs::create_dir_all(&staging)?;
    clients
        .node
        .node_stage_volume(plinth_tests::stage_request(&volume.volume_id, &staging, cap.clone()))
        .await
        .with_context(|| format!("staging the {name} volume"))?;
    clients
        .node
        .node_publish_volume(plinth_tests::publish_request(&volume.volume_id, &staging, &target, cap))
        .await
        .with_context(|| format!("publishing the {name} volume"))?;
    Ok(target)
}

/// `runs` runs of `job` on each side (and on the block volume if `block`), rotating which side
/// goes first.
pub async fn compare(
    job: Job,
    targets: &Targets,
    setup: &Setup,
    runs: usize,
    block: bool,
) -> anyhow::Result<JobResult> {
    let sides: &[Side] = if block { &[Side::Volume, Side::Block, Side::Pool] } else { &[Side::Volume, Side::Pool] };
    let mut figures: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut pair_ratios = Vec::new();
    for run in 0..runs {
        let order: Vec<(usize, PathBuf)> = (0..sides.len())
            .map(|i| (run + i) % sides.len())
            .map(|index| (index, targets.file(sides[index]).to_owned()))
            .collect();
        let setup = *setup;
        let measured = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(usize, f64)>> {
            order.into_iter().map(|(index, file)| Ok((index, fio::measure(&job, &file, &setup)?))).collect()
        })
        .await??;
        let mut this_run = BTreeMap::new();
        for (index, figure) in measured {
            figures.entry(index).or_default().push(figure);
            this_run.insert(sides[index], figure);
        }
        pair_ratios.push(this_run[&Side::Volume] / this_run[&Side::Pool]);
    }
    let mut of = |side: Side| sides.iter().position(|s| *s == side).map(|i| figures.remove(&i).unwrap_or_default());
    let (plinth, pool, block) =
        (of(Side::Volume).unwrap_or_default(), of(Side::Pool).unwrap_or_default(), of(Side::Block));
    let (plinth_median, pool_median) = (median(&plinth), median(&pool));
    let block_median = block.as_deref().map(median);
    Ok(JobResult {
        job,
        unit: job.metric.unit(),
        plinth,
        pool,
        plinth_median,
        pool_median,
        ratio: plinth_median / pool_median,
        pair_ratios,
        block: block.unwrap_or_default(),
        block_median,
        block_ratio: block_median.map(|b| b / pool_median),
    })
}

/// The whole data-path section.
pub async fn data_path(targets: &Targets, setup: &Setup, runs: usize) -> anyhow::Result<DataPath> {
    let queue = queue_settings(targets.device);
    let mut jobs = Vec::new();
    for job in fio::JOBS {
        let result = compare(job, targets, setup, runs, true).await?;
        eprintln!(
            "  {:<18} plinth {:>9.0} block {:>9.0} pool {:>9.0} {}  ×{:.2}",
            job.name,
            result.plinth_median,
            result.block_median.unwrap_or_default(),
            result.pool_median,
            result.unit,
            result.ratio
        );
        jobs.push(result);
    }
    Ok(DataPath {
        setup: *setup,
        runs,
        loop_device: targets.device.path().display().to_string(),
        direct_io: targets.device.direct_io(),
        queue,
        jobs,
    })
}

/// Unpublishes and unstages what [`prepare`] made (the sandbox sweeps whatever this misses).
pub async fn release(clients: &mut Clients, sandbox: &Sandbox) -> anyhow::Result<()> {
    for name in ["fio", "fio-block"] {
        let id = plinth_engine::VolumeId::for_name(name).to_string();
        clients
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: sandbox.root().join(format!("{name}-target")).display().to_string(),
            })
            .await?;
        clients
            .node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: sandbox.root().join(format!("{name}-staging")).display().to_string(),
            })
            .await?;
        clients.controller.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await?;
    }
    let _ = std::fs::remove_dir_all(sandbox.path().join("pool-filesystem"));
    Ok(())
}
