//! What the figures were measured on, and whether the machine was quiet enough to trust them.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Programs whose presence means someone is compiling (or running CI) on this shared machine.
const BUSY_PROGRAMS: &[&str] = &["rustc", "cargo", "go", "compile", "link", "cc1", "cc1plus", "ld"];

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub pool_device: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Machine {
    pub fn describe(pool_dir: &Path) -> Self {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Self {
            hostname: read("/proc/sys/kernel/hostname").trim().to_owned(),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model,
            memory_gib: memory_kib / (1024.0 * 1024.0),
            pool_device: filesystem_of(pool_dir),
        }
    }
}

/// "ext4 on /dev/vda" for the filesystem holding `path` (the longest mount point above it).
pub fn filesystem_of(path: &Path) -> String {
    let table = read("/proc/self/mountinfo");
    let mounts = plinth_engine::sys::mountinfo::parse(&table).unwrap_or_default();
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
        .map(|m| format!("{} on {}", m.fs_type, m.source))
        .unwrap_or_else(|| "unknown".into())
}

/// CPU time of the whole machine so far from /proc/stat's first line, in clock ticks: (busy,
/// all). Busy is everything but idle and iowait (a CPU waiting for the disk could run work);
/// steal (time the hypervisor gave to others) counts as neither: it was never ours.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTicks {
    busy: u64,
    all: u64,
}

impl CpuTicks {
    pub fn now() -> Self {
        let text = read("/proc/stat");
        let ticks: Vec<u64> = text
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let field = |i: usize| ticks.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        let all = (0..7).map(field).sum::<u64>();
        Self { busy: all - field(3) - field(4), all }
    }

    /// The busy ticks and all ticks since `earlier`.
    pub fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks { busy: self.busy - earlier.busy, all: self.all - earlier.all }
    }

    pub fn add(&mut self, other: CpuTicks) {
        self.busy += other.busy;
        self.all += other.all;
    }

    /// How many CPUs were busy on average, out of `cpus`.
    pub fn busy_cpus(self, cpus: usize) -> f64 {
        if self.all == 0 { f64::NAN } else { self.busy as f64 / self.all as f64 * cpus as f64 }
    }
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> [f64; 3] {
    let text = read("/proc/loadavg");
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(f64::NAN));
    [fields.next().unwrap_or(f64::NAN), fields.next().unwrap_or(f64::NAN), fields.next().unwrap_or(f64::NAN)]
}

/// This process and its ancestors (`cargo run` is our own parent, not someone else's build).
fn own_lineage() -> Vec<u32> {
    let mut lineage = vec![std::process::id()];
    let mut pid = std::process::id();
    while pid > 1 {
        let stat = read(&format!("/proc/{pid}/stat"));
        // The parent is the second field after the parenthesised command name.
        let Some(parent) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)) else { break };
        let Ok(parent) = parent.parse() else { break };
        lineage.push(parent);
        pid = parent;
    }
    lineage
}

/// Compilers and build tools running now, other than our own ancestors: `name (pid)`.
pub fn busy_processes() -> Vec<String> {
    let lineage = own_lineage();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut busy: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| !lineage.contains(pid))
        .filter_map(|pid| {
            let comm = read(&format!("/proc/{pid}/comm")).trim().to_owned();
            BUSY_PROGRAMS.contains(&comm.as_str()).then(|| format!("{comm} ({pid})"))
        })
        .collect();
    busy.sort();
    busy
}

#[derive(Debug, Clone, Serialize)]
pub struct Quiet {
    pub load_average: [f64; 3],
    pub busy_processes: Vec<String>,
    pub quiet: bool,
    pub waited_s: f64,
}

/// Whether the machine is quiet: 1-minute load below `max_load` and nobody compiling.
pub fn quiet_now(max_load: f64) -> Quiet {
    let load_average = load_average();
    let busy_processes = busy_processes();
    let quiet = load_average[0] < max_load && busy_processes.is_empty();
    Quiet { load_average, busy_processes, quiet, waited_s: 0.0 }
}

/// Waits up to `patience` for a quiet machine (checked every 15 s); returns the last reading.
pub fn wait_for_quiet(max_load: f64, patience: Duration) -> Quiet {
    let started = Instant::now();
    loop {
        let mut now = quiet_now(max_load);
        now.waited_s = started.elapsed().as_secs_f64();
        if now.quiet || started.elapsed() >= patience {
            return now;
        }
        eprintln!(
            "waiting for a quiet machine: load {:.2}, busy: {}",
            now.load_average[0],
            if now.busy_processes.is_empty() { "none".to_owned() } else { now.busy_processes.join(", ") }
        );
        std::thread::sleep(Duration::from_secs(15));
    }
}

/// The git revision of the tree the harness runs from, with "-dirty" for local changes.
pub fn git_revision() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(rev) = run(&["rev-parse", "--short", "HEAD"]) else { return "unknown".into() };
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{rev}-dirty") } else { rev }
}
