//! Footprint and scale: plinth's RSS idle and with N volumes (some staged), CreateVolume at 10
//! and at N existing volumes, a full paginated ListVolumes, and restart → Probe ready with N
//! volumes on the node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use plinth_proto::csi_v1 as csi;
use plinth_tests::{Clients, Plinth, Sandbox};
use serde::Serialize;

use crate::client;
use crate::poolfs::{self, PoolKind};
use crate::stats::{Latency, ms};

/// Small volumes: what is measured is bookkeeping, not bytes.
const VOLUME_BYTES: i64 = 16 << 20;
/// Clients creating and staging the volumes at once (fills faster; not measured).
const FILLERS: usize = 4;

/// Resident memory of a process (KiB): in total, anonymous (heap, stacks: the process's own), and
/// file-backed (the pages of its binary and libraries that it touched: shared and reclaimable).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rss {
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub peak_kib: u64,
}

impl Rss {
    pub fn of(pid: i32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Self {
            rss_kib: field("VmRSS:"),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
            peak_kib: field("VmHWM:"),
        }
    }

    pub fn mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Scale {
    pub volumes: usize,
    pub staged: usize,
    /// Started, socket bound, no RPC answered yet.
    pub rss_start: Rss,
    /// After answering its first Probe (the gRPC stack touched), then a second of rest.
    pub rss_idle: Rss,
    /// With all volumes created and staged, after the full listings.
    pub rss_full: Rss,
    /// Restarted on all those volumes, after its first Probe.
    pub rss_after_restart: Rss,
    pub create_at_10: Latency,
    pub create_at_full: Latency,
    pub list_all: Latency,
    pub list_page_size: i32,
    pub restart_to_ready: Latency,
    pub fill_s: f64,
}

struct Node<'a> {
    sandbox: &'a Sandbox,
    socket: PathBuf,
    data_dir: PathBuf,
}

impl Node<'_> {
    fn start(&self) -> Plinth {
        Plinth::start_at(&self.socket, &self.sandbox.root(), "standalone", &self.data_dir, &[], false)
    }
}

async fn wait_ready(socket: &Path, started: Instant) -> anyhow::Result<Duration> {
    while started.elapsed() < Duration::from_secs(120) {
        if client::ready(socket).await {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bail!("plinth did not become ready within 120 s")
}

async fn create(clients: &mut Clients, name: &str) -> anyhow::Result<String> {
    Ok(clients
        .controller
        .create_volume(plinth_tests::create_request(name, VOLUME_BYTES, plinth_tests::mount_cap("ext4")))
        .await
        .with_context(|| format!("creating {name}"))?
        .into_inner()
        .volume
        .context("no volume")?
        .volume_id)
}

/// One CreateVolume's latency (ms), with the node's volume count held constant: it is deleted.
async fn create_once(clients: &mut Clients, name: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let id = create(clients, name).await?;
    let elapsed = ms(started.elapsed());
    clients.controller.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await?;
    Ok(elapsed)
}

/// CreateVolume latency on two nodes, their creates alternating (ABBA) so that both see the same
/// disk: this VM's fsync latency drifts by 2× between minutes, more than what is compared.
async fn create_latency_side_by_side(
    small: &mut Clients,
    large: &mut Clients,
    samples: usize,
) -> anyhow::Result<(Latency, Latency)> {
    let (mut on_small, mut on_large) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let small_first = i % 2 == 0;
        for small_turn in [small_first, !small_first] {
            if small_turn {
                on_small.push(create_once(small, &format!("probe-small-{i}")).await?);
            } else {
                on_large.push(create_once(large, &format!("probe-large-{i}")).await?);
            }
        }
    }
    Ok((Latency::of(on_small), Latency::of(on_large)))
}

/// `count` volumes named `fill-{from..}`, created by several clients at once; the first `stage`
/// of them staged. Returns nothing measured.
async fn fill(clients: &Clients, root: &Path, from: usize, count: usize, stage: usize) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for filler in 0..FILLERS {
        let mut clients = clients.clone();
        let root = root.to_owned();
        tasks.spawn(async move {
            for i in (from + filler..from + count).step_by(FILLERS) {
                let id = create(&mut clients, &format!("fill-{i}")).await?;
                if i - from < stage {
                    let staging = root.join(format!("scale-stage-{i}"));
                    std::fs::create_dir_all(&staging)?;
                    clients
                        .node
                        .node_stage_volume(plinth_tests::stage_request(&id, &staging, plinth_tests::mount_cap("ext4")))
                        .await
                        .with_context(|| format!("staging fill-{i}"))?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// One full ListVolumes walk, page by page; the number of volumes it saw.
async fn list_all(clients: &mut Clients, page_size: i32) -> anyhow::Result<usize> {
    let (mut seen, mut token) = (0, String::new());
    loop {
        let page = clients
            .controller
            .list_volumes(csi::ListVolumesRequest { max_entries: page_size, starting_token: token })
            .await?
            .into_inner();
        seen += page.entries.len();
        if page.next_token.is_empty() {
            return Ok(seen);
        }
        token = page.next_token;
    }
}

pub struct Plan {
    pub volumes: usize,
    pub staged: usize,
    pub samples: usize,
    pub restarts: usize,
}

pub async fn scale(plan: &Plan, sandbox: Sandbox) -> anyhow::Result<Scale> {
    // A sparse pool large enough for every thin volume's promise (plinth reserves the full size).
    let pool = poolfs::make(&sandbox, PoolKind::Ext4, (plan.volumes as u64 + 64) * VOLUME_BYTES as u64 * 2)?;
    let node = Node { sandbox: &sandbox, socket: sandbox.socket(), data_dir: pool.join("data") };
    let mut plinth = node.start();
    let started = Instant::now();
    while !sandbox.socket().exists() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("plinth did not bind its socket within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_start = Rss::of(plinth.pid());
    wait_ready(&sandbox.socket(), started).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = Rss::of(plinth.pid());
    let mut clients = client::connect(&sandbox.socket()).await?;

    let base = 10usize.min(plan.volumes);
    fill(&clients, &sandbox.root(), 0, base, 0).await?;

    let started = Instant::now();
    fill(&clients, &sandbox.root(), base, plan.volumes - base, plan.staged.saturating_sub(base)).await?;
    // The base volumes count among the staged ones too; stage them now.
    for i in 0..base.min(plan.staged) {
        let id = plinth_engine::VolumeId::for_name(&format!("fill-{i}")).to_string();
        let staging = sandbox.root().join(format!("scale-stage-{i}"));
        std::fs::create_dir_all(&staging)?;
        clients
            .node
            .node_stage_volume(plinth_tests::stage_request(&id, &staging, plinth_tests::mount_cap("ext4")))
            .await?;
    }
    let fill_s = started.elapsed().as_secs_f64();
    eprintln!("  filled to {} volumes ({} staged) in {fill_s:.1} s", plan.volumes, plan.staged);

    // CreateVolume at 10 volumes: a second plinth on the same pool filesystem keeps 10, and its
    // creates alternate with the full node's.
    let small =
        Node { sandbox: &sandbox, socket: sandbox.path().join("small.sock"), data_dir: pool.join("data-small") };
    let small_plinth = small.start();
    wait_ready(&small.socket, Instant::now()).await?;
    let mut small_clients = client::connect(&small.socket).await?;
    fill(&small_clients, &sandbox.root(), 0, base, 0).await?;
    let (create_at_10, create_at_full) =
        create_latency_side_by_side(&mut small_clients, &mut clients, plan.samples).await?;
    drop(small_clients);
    drop(small_plinth);
    eprintln!(
        "  CreateVolume p50 at {base}: {:.1} ms, at {}: {:.1} ms (alternating)",
        create_at_10.p50_ms, plan.volumes, create_at_full.p50_ms
    );

    let page_size = 100;
    let mut list_times = Vec::new();
    for _ in 0..plan.samples.clamp(3, 10) {
        let started = Instant::now();
        let seen = list_all(&mut clients, page_size).await?;
        list_times.push(ms(started.elapsed()));
        if seen != plan.volumes {
            bail!("ListVolumes saw {seen} volumes, not {}", plan.volumes);
        }
    }
    let list_all = Latency::of(list_times);
    let rss_full = Rss::of(plinth.pid());
    eprintln!("  full ListVolumes p50 {:.1} ms; RSS {:.1} MiB", list_all.p50_ms, rss_full.mib());
    drop(clients);

    let mut restarts = Vec::new();
    for _ in 0..plan.restarts {
        plinth.stop();
        let started = Instant::now();
        plinth = node.start();
        restarts.push(ms(wait_ready(&sandbox.socket(), started).await?));
    }
    let restart_to_ready = Latency::of(restarts);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_restart = Rss::of(plinth.pid());
    eprintln!(
        "  restart → ready p50 {:.0} ms; RSS after restart {:.1} MiB",
        restart_to_ready.p50_ms,
        rss_after_restart.mib()
    );
    plinth.stop();
    Ok(Scale {
        volumes: plan.volumes,
        staged: plan.staged,
        rss_start,
        rss_idle,
        rss_full,
        rss_after_restart,
        create_at_10,
        create_at_full,
        list_all,
        list_page_size: page_size,
        restart_to_ready,
        fill_s,
    })
}
