//! Control path: the lifecycle create → stage → publish → unpublish → unstage → delete through
//! plinth's CSI API against the raw tool chain, cycle by cycle, alternating which goes first so
//! neither always runs on a warmer (or noisier) machine; then 8-way parallel throughput.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use plinth_proto::csi_v1 as csi;
use plinth_tests::{Clients, Sandbox};
use serde::Serialize;

use crate::kind::Kind;
use crate::machine::CpuTicks;
use crate::raw::{self, RawVolume, STEPS};
use crate::stats::{Latency, ms};

/// Volumes of the lifecycle are 1 GiB, as in the figures.
pub const VOLUME_BYTES: u64 = 1 << 30;
/// Unmeasured cycles first: page cache, loop device allocation, the first mkfs.
const WARMUP: usize = 2;

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: &'static str,
    pub plinth: Latency,
    pub raw: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Lifecycle {
    pub kind: Kind,
    pub cycles: usize,
    pub steps: Vec<Step>,
    pub plinth_cycle: Latency,
    pub raw_cycle: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Parallel {
    pub kind: Kind,
    pub workers: usize,
    pub cycles: usize,
    pub plinth_cycles_per_s: f64,
    /// Sequential throughput of the same kind, measured in batches alternating with the parallel ones.
    pub plinth_sequential_cycles_per_s: f64,
    pub raw_cycles_per_s: f64,
    pub raw_sequential_cycles_per_s: f64,
    /// CPUs busy on average (the whole machine, out of `cpus`) during plinth's sequential and
    /// parallel batches: how close the parallel run comes to using the whole machine, and what
    /// a cycle costs in CPU either way.
    pub cpus: usize,
    pub plinth_sequential_busy_cpus: f64,
    pub plinth_parallel_busy_cpus: f64,
}

/// The paths one worker uses for plinth and for the raw chain, below the sandbox's allowed root.
struct WorkerPaths {
    plinth_staging: PathBuf,
    plinth_target: PathBuf,
    raw: RawVolume,
}

fn worker_paths(sandbox: &Sandbox, worker: usize) -> anyhow::Result<WorkerPaths> {
    let root = sandbox.root();
    let raw_dir = sandbox.path().join("raw");
    let paths = WorkerPaths {
        plinth_staging: root.join(format!("plinth-staging-{worker}")),
        plinth_target: root.join(format!("plinth-target-{worker}")),
        raw: RawVolume {
            image: raw_dir.join(format!("raw-{worker}.img")),
            staging: root.join(format!("raw-staging-{worker}")),
            target: root.join(format!("raw-target-{worker}")),
        },
    };
    // A CO creates staging directories; publish creates the target (plinth and raw alike).
    for dir in [&raw_dir, &paths.plinth_staging, &paths.raw.staging] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(paths)
}

/// One plinth cycle through CSI: the duration of each RPC of [`STEPS`].
pub async fn plinth_cycle(
    clients: &mut Clients,
    kind: Kind,
    name: &str,
    staging: &Path,
    target: &Path,
) -> anyhow::Result<[Duration; 6]> {
    let mut times = [Duration::ZERO; 6];
    let cap = kind.capability();
    let started = Instant::now();
    let volume = clients
        .controller
        .create_volume(plinth_tests::create_request(name, VOLUME_BYTES as i64, cap.clone()))
        .await
        .with_context(|| format!("CreateVolume {name}"))?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    times[0] = started.elapsed();
    let id = volume.volume_id;
    let started = Instant::now();
    clients
        .node
        .node_stage_volume(plinth_tests::stage_request(&id, staging, cap.clone()))
        .await
        .with_context(|| format!("NodeStageVolume {name}"))?;
    times[1] = started.elapsed();
    let started = Instant::now();
    clients
        .node
        .node_publish_volume(plinth_tests::publish_request(&id, staging, target, cap))
        .await
        .with_context(|| format!("NodePublishVolume {name}"))?;
    times[2] = started.elapsed();
    let started = Instant::now();
    clients
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .with_context(|| format!("NodeUnpublishVolume {name}"))?;
    times[3] = started.elapsed();
    let started = Instant::now();
    clients
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .with_context(|| format!("NodeUnstageVolume {name}"))?;
    times[4] = started.elapsed();
    let started = Instant::now();
    clients
        .controller
        .delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() })
        .await
        .with_context(|| format!("DeleteVolume {name}"))?;
    times[5] = started.elapsed();
    Ok(times)
}

async fn raw_cycle(kind: Kind, volume: &RawVolume) -> anyhow::Result<[Duration; 6]> {
    let volume =
        RawVolume { image: volume.image.clone(), staging: volume.staging.clone(), target: volume.target.clone() };
    tokio::task::spawn_blocking(move || raw::cycle(kind, &volume, VOLUME_BYTES)).await?
}

fn summarise(kind: Kind, plinth: &[[Duration; 6]], raw: &[[Duration; 6]]) -> Lifecycle {
    let column = |samples: &[[Duration; 6]], i: usize| samples.iter().map(|s| ms(s[i])).collect::<Vec<_>>();
    let total = |samples: &[[Duration; 6]]| samples.iter().map(|s| ms(s.iter().sum())).collect::<Vec<_>>();
    Lifecycle {
        kind,
        cycles: plinth.len(),
        steps: STEPS
            .iter()
            .enumerate()
            .map(|(i, step)| Step { step, plinth: Latency::of(column(plinth, i)), raw: Latency::of(column(raw, i)) })
            .collect(),
        plinth_cycle: Latency::of(total(plinth)),
        raw_cycle: Latency::of(total(raw)),
    }
}

/// `cycles` measured lifecycles of `kind`, plinth and raw alternating which goes first.
pub async fn lifecycle(
    clients: &mut Clients,
    sandbox: &Sandbox,
    kind: Kind,
    cycles: usize,
) -> anyhow::Result<Lifecycle> {
    let paths = worker_paths(sandbox, 0)?;
    let (mut plinth, mut raw) = (Vec::new(), Vec::new());
    for i in 0..WARMUP + cycles {
        let name = format!("lifecycle-{}-{i}", kind.name());
        let plinth_first = i % 2 == 0;
        let mut pair = Vec::with_capacity(2);
        for plinth_turn in [plinth_first, !plinth_first] {
            let times = if plinth_turn {
                plinth_cycle(clients, kind, &name, &paths.plinth_staging, &paths.plinth_target).await?
            } else {
                raw_cycle(kind, &paths.raw).await?
            };
            pair.push((plinth_turn, times));
        }
        if i < WARMUP {
            continue;
        }
        for (plinth_turn, times) in pair {
            if plinth_turn { plinth.push(times) } else { raw.push(times) }
        }
    }
    Ok(summarise(kind, &plinth, &raw))
}

/// Rounds of the parallel measurement; each runs a sequential batch and a parallel batch.
const PARALLEL_ROUNDS: usize = 5;

/// Runs `cycles` back to back on one worker's paths (plinth, or the raw chain); the wall time.
async fn sequential_batch(
    clients: &Clients,
    kind: Kind,
    paths: &WorkerPaths,
    plinth: bool,
    cycles: usize,
    tag: &str,
) -> anyhow::Result<Duration> {
    let mut clients = clients.clone();
    let started = Instant::now();
    for i in 0..cycles {
        if plinth {
            let name = format!("sequential-{}-{tag}-{i}", kind.name());
            plinth_cycle(&mut clients, kind, &name, &paths.plinth_staging, &paths.plinth_target).await?;
        } else {
            raw_cycle(kind, &paths.raw).await?;
        }
    }
    Ok(started.elapsed())
}

/// Every worker runs `per_worker` cycles at once (plinth, or the raw chain); the wall time.
async fn parallel_batch(
    clients: &Clients,
    kind: Kind,
    all_paths: &[WorkerPaths],
    plinth: bool,
    per_worker: usize,
    tag: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (worker, paths) in all_paths.iter().enumerate() {
        let mut clients = clients.clone();
        let (staging, target) = (paths.plinth_staging.clone(), paths.plinth_target.clone());
        let raw = RawVolume {
            image: paths.raw.image.clone(),
            staging: paths.raw.staging.clone(),
            target: paths.raw.target.clone(),
        };
        let tag = tag.to_owned();
        tasks.spawn(async move {
            for i in 0..per_worker {
                if plinth {
                    let name = format!("parallel-{}-{tag}-{worker}-{i}", kind.name());
                    plinth_cycle(&mut clients, kind, &name, &staging, &target).await?;
                } else {
                    raw_cycle(kind, &raw).await?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}

/// `workers` clients running plinth cycles at once, against the same cycles one at a time, then
/// the same for the raw chain; throughput in cycles per second of wall time. Sequential and
/// parallel batches alternate over several rounds (which goes first alternating too), so both
/// see the same disk: measured minutes apart, this VM's drift alone moved the ratio from 2.3×
/// to 3.3×.
pub async fn parallel(
    clients: &Clients,
    sandbox: &Sandbox,
    kind: Kind,
    workers: usize,
    per_worker: usize,
) -> anyhow::Result<Parallel> {
    let mut all_paths = Vec::new();
    for worker in 0..workers {
        // Worker numbers above the sequential run's, so no path is shared with it.
        all_paths.push(worker_paths(sandbox, worker + 1)?);
    }
    let sequential_paths = worker_paths(sandbox, workers + 1)?;
    let per_round = per_worker.div_ceil(PARALLEL_ROUNDS).max(1);
    // As many sequential cycles per round as one worker's share times two: long enough to
    // average, short enough to stay next to its parallel batch.
    let sequential_per_round = 2 * per_round;
    let mut rates = Vec::new();
    let (mut plinth_parallel_cpu, mut plinth_sequential_cpu) = (CpuTicks::default(), CpuTicks::default());
    for plinth in [true, false] {
        let (mut parallel_time, mut sequential_time) = (Duration::ZERO, Duration::ZERO);
        for round in 0..PARALLEL_ROUNDS {
            let tag = format!("r{round}");
            let parallel_first = round % 2 == 0;
            for parallel_turn in [parallel_first, !parallel_first] {
                let cpu_before = CpuTicks::now();
                if parallel_turn {
                    parallel_time += parallel_batch(clients, kind, &all_paths, plinth, per_round, &tag).await?;
                } else {
                    sequential_time +=
                        sequential_batch(clients, kind, &sequential_paths, plinth, sequential_per_round, &tag).await?;
                }
                let used = CpuTicks::now().since(cpu_before);
                match (plinth, parallel_turn) {
                    (true, true) => plinth_parallel_cpu.add(used),
                    (true, false) => plinth_sequential_cpu.add(used),
                    (false, _) => {}
                }
            }
        }
        let parallel_cycles = (PARALLEL_ROUNDS * workers * per_round) as f64;
        let sequential_cycles = (PARALLEL_ROUNDS * sequential_per_round) as f64;
        rates.push((parallel_cycles / parallel_time.as_secs_f64(), sequential_cycles / sequential_time.as_secs_f64()));
    }
    Ok(Parallel {
        kind,
        workers,
        cycles: PARALLEL_ROUNDS * workers * per_round,
        plinth_cycles_per_s: rates[0].0,
        plinth_sequential_cycles_per_s: rates[0].1,
        raw_cycles_per_s: rates[1].0,
        raw_sequential_cycles_per_s: rates[1].1,
        cpus: crate::machine::cpus(),
        plinth_sequential_busy_cpus: plinth_sequential_cpu.busy_cpus(crate::machine::cpus()),
        plinth_parallel_busy_cpus: plinth_parallel_cpu.busy_cpus(crate::machine::cpus()),
    })
}
