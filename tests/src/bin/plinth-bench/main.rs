//! plinth-bench: plinth and a raw baseline side by side, in one invocation, with ratios.
//!
//! 1. control path — lifecycle p50/p95 per RPC and per cycle (ext4, xfs, btrfs, block) against
//!    the raw tool chain, and 8-way parallel throughput;
//! 2. data path — fio inside a published volume against the pool's own filesystem;
//! 3. footprint — RSS idle and with N volumes; 4. scale — CreateVolume at 10 vs N volumes, a full
//!    paginated ListVolumes, restart → Probe ready;
//! 5. data services — snapshot, clone, restore through the CLI against `cp`.
//!
//! Output: a table on stdout, `plinth-bench.json`, `plinth-bench.txt` and `latency.svg` in
//! `--out`. Everything it makes lives in sandboxes that are swept (loop devices detached, mounts
//! unmounted, files removed) when they drop — on success, on error, on a panic, and on Ctrl-C /
//! SIGTERM; a run killed outright is swept by the next one.
//!
//! `cargo run --release -p plinth-tests --bin plinth-bench -- [--quick] …`; `tests/bench.sh`.

mod client;
mod control;
mod data;
mod fio;
mod kind;
mod knobs;
mod machine;
mod plot;
mod poolfs;
mod raw;
mod report;
mod scale;
mod services;
mod stats;
mod tools;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use plinth_tests::{Plinth, Sandbox};

use kind::Kind;
use poolfs::PoolKind;
use report::Report;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Control,
    Data,
    Knobs,
    Scale,
    Services,
}

#[derive(Debug, Parser)]
#[command(name = "plinth-bench", about = "plinth against the raw baseline, side by side, with ratios")]
struct Options {
    /// Short runs for development (not for published figures): few cycles, one 3 s fio run per
    /// job, 100 volumes, 256 MiB of data in a 2 GiB image.
    #[arg(long)]
    quick: bool,
    /// Sections to run (default: all but `knobs`).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Also run the loop queue knob ablation (one knob at a time, 4k jobs).
    #[arg(long)]
    knobs: bool,
    /// Volume kinds of the control path.
    #[arg(long, value_delimiter = ',', default_value = "ext4,xfs,btrfs,block")]
    kinds: Vec<String>,
    /// Measured lifecycle cycles per kind (default 50; quick 8).
    #[arg(long)]
    cycles: Option<usize>,
    /// Clients of the parallel run.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// fio runs per job and side (default 5; quick 1).
    #[arg(long)]
    fio_runs: Option<usize>,
    /// Seconds per fio run (default 10; quick 3).
    #[arg(long)]
    fio_runtime: Option<u32>,
    /// Volumes on the node for the scale section (default 1000; quick 100).
    #[arg(long)]
    volumes: Option<usize>,
    /// How many of them are staged (default 200; quick 20).
    #[arg(long)]
    staged: Option<usize>,
    /// Repetitions of each data-service operation (default 5; quick 1).
    #[arg(long)]
    repetitions: Option<usize>,
    /// Where the JSON, text and SVG reports go.
    #[arg(long, default_value = "target/plinth-bench")]
    out: PathBuf,
    /// The plinth binary (default: PLINTH_BIN, else `plinth` beside this binary).
    #[arg(long)]
    plinth: Option<PathBuf>,
    /// Wait up to this many seconds for a quiet machine (1-minute load below 0.5, nobody
    /// compiling) before measuring; the load is reported either way.
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
}

/// Everything a run measures, with the quick and full defaults resolved.
struct Plan {
    sections: Vec<Section>,
    kinds: Vec<Kind>,
    cycles: usize,
    parallel: usize,
    per_worker: usize,
    fio: fio::Setup,
    fio_runs: usize,
    knob_runs: usize,
    scale: scale::Plan,
    services: services::Plan,
}

impl Plan {
    fn from(options: &Options) -> anyhow::Result<Self> {
        let quick = options.quick;
        let pick = |value: Option<usize>, full: usize, short: usize| value.unwrap_or(if quick { short } else { full });
        let mut sections = if options.only.is_empty() {
            vec![Section::Control, Section::Data, Section::Scale, Section::Services]
        } else {
            options.only.clone()
        };
        if options.knobs && !sections.contains(&Section::Knobs) {
            sections.push(Section::Knobs);
        }
        let kinds = options
            .kinds
            .iter()
            .map(|k| Kind::parse(k).with_context(|| format!("unknown kind {k:?} (ext4, xfs, btrfs, block)")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let volumes = pick(options.volumes, 1000, 100);
        let staged = pick(options.staged, 200, 20);
        if staged > volumes || volumes < 10 {
            bail!("--staged must not exceed --volumes, and --volumes must be at least 10");
        }
        Ok(Self {
            sections,
            kinds,
            cycles: pick(options.cycles, 50, 8),
            parallel: options.parallel,
            per_worker: if quick { 2 } else { 10 },
            fio: fio::Setup {
                file_bytes: if quick { 256 << 20 } else { 1 << 30 },
                runtime_s: options.fio_runtime.unwrap_or(if quick { 3 } else { 10 }),
                ramp_s: if quick { 1 } else { 2 },
            },
            fio_runs: pick(options.fio_runs, 5, 1),
            knob_runs: if quick { 1 } else { 3 },
            scale: scale::Plan {
                volumes,
                staged,
                samples: if quick { 8 } else { 30 },
                restarts: if quick { 1 } else { 3 },
            },
            services: services::Plan {
                image_bytes: if quick { 2 << 30 } else { 10 << 30 },
                data_bytes: if quick { 256 << 20 } else { 2 << 30 },
                repetitions: pick(options.repetitions, 5, 1),
            },
        })
    }

    fn runs(&self, section: Section) -> bool {
        self.sections.contains(&section)
    }
}

/// Marks a sandbox as this run's, so a later run can sweep it if this one is killed outright.
const OWNER_FILE: &str = "plinth-bench.pid";

fn bench_sandbox() -> anyhow::Result<Sandbox> {
    let sandbox = Sandbox::new();
    std::fs::write(sandbox.path().join(OWNER_FILE), std::process::id().to_string())?;
    Ok(sandbox)
}

/// Sweeps sandboxes of earlier runs whose process is gone (killed with SIGKILL, or the machine's
/// power): their loop devices, mounts and files.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/tmp") else { return };
    for dir in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_FILE)) else { continue };
        if owner.trim().parse::<u32>().is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
            continue;
        }
        eprintln!("sweeping {} (left by a killed run)", dir.display());
        plinth_tests::sweep(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn plinth_binary(options: &Options) -> anyhow::Result<PathBuf> {
    let binary = match (&options.plinth, std::env::var_os("PLINTH_BIN")) {
        (Some(path), _) => path.clone(),
        (None, Some(path)) => PathBuf::from(path),
        (None, None) => std::env::current_exe()?.with_file_name("plinth"),
    };
    if !binary.is_file() {
        bail!("{} is missing: build it first (cargo build --release --bin plinth) or pass --plinth", binary.display());
    }
    Ok(std::fs::canonicalize(binary)?)
}

fn check_tools(plan: &Plan) -> anyhow::Result<()> {
    let mut needed = vec!["truncate", "losetup", "blkid", "mount", "umount", "rm", "cp", "mkfs.ext4", "mkfs.xfs"];
    if plan.kinds.contains(&Kind::Btrfs) {
        needed.push("mkfs.btrfs");
    }
    if [Section::Data, Section::Knobs, Section::Services].iter().any(|s| plan.runs(*s)) {
        needed.push("fio");
    }
    let missing: Vec<&str> = needed.into_iter().filter(|p| !tools::installed(p)).collect();
    if !missing.is_empty() {
        bail!(
            "missing programs: {} (tests/bench.sh installs fio; the rest come with util-linux, e2fsprogs, xfsprogs, btrfs-progs)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Refuses to start a section the shared disk has no room for (its pools are sparse, but the data
/// written into them is real).
fn require_free(bytes: u64, what: &str) -> anyhow::Result<()> {
    let stat = nix::sys::statvfs::statvfs("/tmp").context("statvfs /tmp")?;
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    if free < bytes {
        bail!("{what} needs {} GiB free in /tmp, which has {} GiB", bytes >> 30, free >> 30);
    }
    Ok(())
}

async fn control_and_data(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let sandbox = bench_sandbox()?;
    let plinth = Plinth::start(&sandbox, &[]);
    let mut clients = client::connect(&sandbox.socket()).await?;
    if plan.runs(Section::Control) {
        for kind in &plan.kinds {
            eprintln!("control path: {} × {} lifecycles", plan.cycles, kind.name());
            let lifecycle = control::lifecycle(&mut clients, &sandbox, *kind, plan.cycles).await?;
            eprintln!(
                "  cycle p50 plinth {:.1} ms, raw {:.1} ms",
                lifecycle.plinth_cycle.p50_ms, lifecycle.raw_cycle.p50_ms
            );
            report.lifecycles.push(lifecycle);
        }
        let kind = report.lifecycles.iter().map(|l| l.kind).find(|k| *k == Kind::Ext4).or(plan.kinds.first().copied());
        if let Some(kind) = kind {
            eprintln!("control path: {}-way parallel {} against sequential, alternating", plan.parallel, kind.name());
            let parallel = control::parallel(&clients, &sandbox, kind, plan.parallel, plan.per_worker).await?;
            eprintln!("  {:.1} cycles/s (raw {:.1})", parallel.plinth_cycles_per_s, parallel.raw_cycles_per_s);
            report.parallel = Some(parallel);
        }
    }
    if plan.runs(Section::Data) || plan.runs(Section::Knobs) {
        eprintln!("data path: fio, {} runs per job and side", plan.fio_runs);
        require_free(2 * plan.fio.file_bytes + (2 << 30), "the data path")?;
        let targets = data::prepare(&mut clients, &sandbox, &plan.fio).await?;
        if plan.runs(Section::Data) {
            report.data_path = Some(data::data_path(&targets, &plan.fio, plan.fio_runs).await?);
        }
        if plan.runs(Section::Knobs) {
            eprintln!("loop queue knobs, {} runs each", plan.knob_runs);
            report.knobs = Some(knobs::ablation(&targets, &sandbox, &plan.fio, plan.knob_runs).await?);
        }
        data::release(&mut clients, &sandbox).await?;
    }
    drop(clients);
    drop(plinth);
    Ok(())
}

async fn run(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    if plan.runs(Section::Control) || plan.runs(Section::Data) || plan.runs(Section::Knobs) {
        control_and_data(plan, report).await?;
    }
    if plan.runs(Section::Scale) {
        eprintln!("footprint and scale: {} volumes, {} staged", plan.scale.volumes, plan.scale.staged);
        report.scale = Some(scale::scale(&plan.scale, bench_sandbox()?).await?);
    }
    if plan.runs(Section::Services) {
        // The source's data, one copy at a time beside it and a snapshot, plus room to breathe.
        require_free(3 * plan.services.data_bytes + (4 << 30), "the data services")?;
        for kind in [PoolKind::Ext4, PoolKind::XfsReflink] {
            eprintln!("data services on a {} pool", kind.name());
            report.services.push(services::services(kind, &plan.services, bench_sandbox()?).await?);
        }
    }
    Ok(())
}

fn write_outputs(out: &Path, report: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("plinth-bench.json"), serde_json::to_vec_pretty(report)?)?;
    std::fs::write(out.join("plinth-bench.txt"), report.table())?;
    if !report.lifecycles.is_empty() {
        let caption = format!(
            "plinth vs raw tool chain: lifecycle latency distribution — {} — load {:.2}",
            report.started_utc,
            report.quiet_at_start.as_ref().map_or(f64::NAN, |q| q.load_average[0])
        );
        std::fs::write(out.join("latency.svg"), plot::latency_svg(&report.lifecycles, &caption))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let plan = Plan::from(&options)?;
    if !plinth_tests::is_root() {
        bail!("plinth-bench needs root (loop devices, mounts)");
    }
    check_tools(&plan)?;
    let binary = plinth_binary(&options)?;
    // SAFETY: no other thread exists yet (the runtime starts below); the test support reads
    // PLINTH_BIN to find the plinth it starts.
    unsafe { std::env::set_var("PLINTH_BIN", &binary) };
    sweep_stale();
    let quiet = if options.wait_quiet > 0 {
        machine::wait_for_quiet(0.5, Duration::from_secs(options.wait_quiet))
    } else {
        machine::quiet_now(0.5)
    };
    let started = Instant::now();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_utc: report::utc(now),
        revision: machine::git_revision(),
        plinth_binary: binary.display().to_string(),
        machine: Some(machine::Machine::describe(Path::new("/tmp"))),
        quiet_at_start: Some(quiet),
        quick: options.quick,
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        // Dropping the run on a signal drops its sandboxes and plinth processes: clean-up runs.
        tokio::select! {
            result = run(&plan, &mut report) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (SIGINT); cleaned up")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated (SIGTERM); cleaned up")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(30));
    report.duration_s = started.elapsed().as_secs_f64();
    report.load_average_at_end = machine::load_average();
    report.judge();
    write_outputs(&options.out, &report)?;
    print!("{}", report.table());
    eprintln!("reports in {}", options.out.display());
    outcome
}
