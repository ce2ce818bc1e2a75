//! Data path: the same fio job inside a published plinth volume and on the pool's own filesystem,
//! runs alternating between the two (ABBA order), median of each side. This VM's I/O drifts
//! by tens of percent within minutes; alternating puts the drift on both sides equally.

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

/// The files fio works on: inside the published volume, and beside the pool on its filesystem.
pub struct Targets {
    pub volume_file: PathBuf,
    pub pool_file: PathBuf,
    pub device: plinth_engine::sys::loopdev::LoopDevice,
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

/// Creates, stages and publishes an ext4 volume for fio, and a directory on the pool's
/// filesystem for the baseline; lays out both test files.
pub async fn prepare(clients: &mut Clients, sandbox: &Sandbox, setup: &Setup) -> anyhow::Result<Targets> {
    let cap = plinth_tests::mount_cap("ext4");
    // Room for the file plus ext4's own metadata.
    let size = (setup.file_bytes + (512 << 20)) as i64;
    let volume = clients
        .controller
        .create_volume(plinth_tests::create_request("fio", size, cap.clone()))
        .await
        .context("creating the fio volume")?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    let (staging, target) = (sandbox.root().join("fio-staging"), sandbox.root().join("fio-target"));
    std::fs::create_dir_all(&staging)?;
    clients
        .node
        .node_stage_volume(plinth_tests::stage_request(&volume.volume_id, &staging, cap.clone()))
        .await
        .context("staging the fio volume")?;
    clients
        .node
        .node_publish_volume(plinth_tests::publish_request(&volume.volume_id, &staging, &target, cap))
        .await
        .context("publishing the fio volume")?;
    let pool = sandbox.data_dir().join("pool");
    let baseline = sandbox.path().join("pool-filesystem");
    std::fs::create_dir_all(&baseline)?;
    if std::fs::metadata(&pool)?.dev() != std::fs::metadata(&baseline)?.dev() {
        bail!("{} is not on the pool's filesystem", baseline.display());
    }
    let device = device_of(&pool.join(format!("{}.img", volume.volume_id)))?;
    let targets = Targets { volume_file: target.join("fio.dat"), pool_file: baseline.join("fio.dat"), device };
    let setup = *setup;
    let (volume_file, pool_file) = (targets.volume_file.clone(), targets.pool_file.clone());
    tokio::task::spawn_blocking(move || {
        fio::prefill(&volume_file, &setup)?;
        fio::prefill(&pool_file, &setup)
    })
    .await??;
    Ok(targets)
}

/// `runs` runs of `job` on each side, alternating which side goes first.
pub async fn compare(job: Job, targets: &Targets, setup: &Setup, runs: usize) -> anyhow::Result<JobResult> {
    let (mut plinth, mut pool, mut pair_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let (volume_file, pool_file, setup) = (targets.volume_file.clone(), targets.pool_file.clone(), *setup);
        let plinth_first = run % 2 == 0;
        let (on_volume, on_pool) = tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, f64)> {
            if plinth_first {
                let v = fio::measure(&job, &volume_file, &setup)?;
                Ok((v, fio::measure(&job, &pool_file, &setup)?))
            } else {
                let p = fio::measure(&job, &pool_file, &setup)?;
                Ok((fio::measure(&job, &volume_file, &setup)?, p))
            }
        })
        .await??;
        plinth.push(on_volume);
        pool.push(on_pool);
        pair_ratios.push(on_volume / on_pool);
    }
    let (plinth_median, pool_median) = (median(&plinth), median(&pool));
    Ok(JobResult {
        job,
        unit: job.metric.unit(),
        plinth,
        pool,
        plinth_median,
        pool_median,
        ratio: plinth_median / pool_median,
        pair_ratios,
    })
}

/// The whole data-path section.
pub async fn data_path(targets: &Targets, setup: &Setup, runs: usize) -> anyhow::Result<DataPath> {
    let queue = queue_settings(targets.device);
    let mut jobs = Vec::new();
    for job in fio::JOBS {
        let result = compare(job, targets, setup, runs).await?;
        eprintln!(
            "  {:<18} plinth {:>9.0} pool {:>9.0} {}  ×{:.2}",
            job.name, result.plinth_median, result.pool_median, result.unit, result.ratio
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
    let id = plinth_engine::VolumeId::for_name("fio").to_string();
    clients
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: sandbox.root().join("fio-target").display().to_string(),
        })
        .await?;
    clients
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: sandbox.root().join("fio-staging").display().to_string(),
        })
        .await?;
    clients.controller.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await?;
    let _ = std::fs::remove_dir_all(sandbox.path().join("pool-filesystem"));
    Ok(())
}
