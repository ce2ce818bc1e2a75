//! The report: every figure with its baseline and ratio, the targets of issue 12 judged, printed
//! as a table and written as JSON.

use std::fmt::Write;

use serde::Serialize;

use crate::control::{Lifecycle, Parallel};
use crate::data::DataPath;
use crate::knobs::KnobResult;
use crate::machine::{Machine, Quiet};
use crate::scale::Scale;
use crate::services::Services;

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub measured: String,
    pub goal: String,
    pub met: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub command: String,
    pub started_utc: String,
    pub revision: String,
    pub plinth_binary: String,
    pub machine: Option<Machine>,
    pub quiet_at_start: Option<Quiet>,
    pub load_average_at_end: [f64; 3],
    pub duration_s: f64,
    pub quick: bool,
    pub lifecycles: Vec<Lifecycle>,
    pub parallel: Option<Parallel>,
    pub data_path: Option<DataPath>,
    pub knobs: Option<Vec<KnobResult>>,
    pub scale: Option<Scale>,
    pub services: Vec<Services>,
    pub targets: Vec<Target>,
}

fn target(name: String, measured: String, goal: &str, met: bool) -> Target {
    Target { name, measured, goal: goal.to_owned(), met }
}

impl Report {
    /// Judges every target the run has figures for.
    pub fn judge(&mut self) {
        let mut targets = Vec::new();
        for l in &self.lifecycles {
            let ratio = l.plinth_cycle.p50_ms / l.raw_cycle.p50_ms;
            targets.push(target(
                format!("lifecycle {} p50 vs raw chain", l.kind.name()),
                format!("{:.1} / {:.1} ms = {ratio:.2}×", l.plinth_cycle.p50_ms, l.raw_cycle.p50_ms),
                "≤ 0.90×",
                ratio <= 0.90,
            ));
        }
        if let Some(p) = &self.parallel {
            let ratio = p.plinth_cycles_per_s / p.plinth_sequential_cycles_per_s;
            targets.push(target(
                format!("{}-way parallel {} vs sequential", p.workers, p.kind.name()),
                format!(
                    "{:.1} / {:.1} cycles/s = {ratio:.2}×",
                    p.plinth_cycles_per_s, p.plinth_sequential_cycles_per_s
                ),
                "≥ 2.5×",
                ratio >= 2.5,
            ));
        }
        if let Some(d) = &self.data_path {
            for j in &d.jobs {
                targets.push(target(
                    format!("fio {} vs pool filesystem", j.job.name),
                    format!("{:.0} / {:.0} {} = {:.2}×", j.plinth_median, j.pool_median, j.unit, j.ratio),
                    "≥ 0.95×",
                    j.ratio >= 0.95,
                ));
            }
        }
        if let Some(s) = &self.scale {
            targets.push(target(
                "RSS idle (after its first Probe)".into(),
                format!("{:.1} MiB ({:.1} MiB before any RPC)", s.rss_idle.mib(), s.rss_start.mib()),
                "≤ 10 MiB",
                s.rss_idle.rss_kib <= 10 * 1024,
            ));
            let full = if s.rss_full.rss_kib >= s.rss_after_restart.rss_kib { s.rss_full } else { s.rss_after_restart };
            targets.push(target(
                format!("RSS with {} volumes ({} staged)", s.volumes, s.staged),
                format!(
                    "{:.1} MiB (after listing {:.1}, after restart {:.1})",
                    full.mib(),
                    s.rss_full.mib(),
                    s.rss_after_restart.mib()
                ),
                "≤ 30 MiB",
                full.rss_kib <= 30 * 1024,
            ));
            let ratio = s.create_at_full.p50_ms / s.create_at_10.p50_ms;
            targets.push(target(
                format!("CreateVolume p50 at {} vs at 10 volumes", s.volumes),
                format!("{:.2} / {:.2} ms = {ratio:.2}×", s.create_at_full.p50_ms, s.create_at_10.p50_ms),
                "≤ 1.2×",
                ratio <= 1.2,
            ));
            targets.push(target(
                format!("restart → Probe ready, {} volumes ({} staged)", s.volumes, s.staged),
                format!("p50 {:.0} ms, max {:.0} ms", s.restart_to_ready.p50_ms, s.restart_to_ready.max_ms),
                "≤ 2 s",
                s.restart_to_ready.p50_ms <= 2000.0,
            ));
        }
        for s in &self.services {
            for op in &s.operations {
                let (goal, met, measured) = if s.pool == "ext4" {
                    let ratio = op.plinth.p50_ms / op.cp_fsync.p50_ms;
                    (
                        "≤ 1.1× cp+fsync",
                        ratio <= 1.1,
                        format!(
                            "{:.0} / {:.0} ms = {ratio:.2}× (cp alone {:.0} ms: {:.2}×)",
                            op.plinth.p50_ms,
                            op.cp_fsync.p50_ms,
                            op.cp.p50_ms,
                            op.plinth.p50_ms / op.cp.p50_ms
                        ),
                    )
                } else {
                    (
                        "≤ 50 ms",
                        op.plinth.p50_ms <= 50.0,
                        format!("{:.1} ms (cp --reflink {:.1} ms)", op.plinth.p50_ms, op.cp.p50_ms),
                    )
                };
                targets.push(target(
                    format!("{} on {} pool ({} copy)", op.operation, s.pool, s.copy_method),
                    measured,
                    goal,
                    met,
                ));
            }
        }
        self.targets = targets;
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "plinth-bench  {}  rev {}", self.started_utc, self.revision);
        if let Some(m) = &self.machine {
            let _ = writeln!(
                out,
                "machine: {} — {} × {} cores, {:.1} GiB RAM, kernel {}; pool filesystem {}",
                m.hostname, m.cpu_model, m.cpus, m.memory_gib, m.kernel, m.pool_device
            );
        }
        if let Some(q) = &self.quiet_at_start {
            let _ = writeln!(
                out,
                "load average at start: {:.2} {:.2} {:.2} ({}{}); at end: {:.2} {:.2} {:.2}",
                q.load_average[0],
                q.load_average[1],
                q.load_average[2],
                if q.quiet { "quiet" } else { "NOT quiet" },
                if q.busy_processes.is_empty() {
                    String::new()
                } else {
                    format!(", busy: {}", q.busy_processes.join(", "))
                },
                self.load_average_at_end[0],
                self.load_average_at_end[1],
                self.load_average_at_end[2]
            );
        }
        let _ = writeln!(out, "command: {}", self.command);
        if !self.lifecycles.is_empty() {
            let _ =
                writeln!(out, "\n1. Control path: 1 GiB volumes, p50 / p95 ms (plinth over CSI vs the raw tool chain)");
            let _ = writeln!(
                out,
                "   {:<7} {:<20} {:>8} {:>8}   {:>8} {:>8}   {:>6}",
                "kind", "step", "plinth", "p95", "raw", "p95", "ratio"
            );
            for l in &self.lifecycles {
                for s in &l.steps {
                    let _ = writeln!(
                        out,
                        "   {:<7} {:<20} {:>8.2} {:>8.2}   {:>8.2} {:>8.2}   {:>5.2}×",
                        l.kind.name(),
                        s.step,
                        s.plinth.p50_ms,
                        s.plinth.p95_ms,
                        s.raw.p50_ms,
                        s.raw.p95_ms,
                        s.plinth.p50_ms / s.raw.p50_ms
                    );
                }
                let _ = writeln!(
                    out,
                    "   {:<7} {:<20} {:>8.2} {:>8.2}   {:>8.2} {:>8.2}   {:>5.2}×",
                    l.kind.name(),
                    format!("cycle ({} cycles)", l.cycles),
                    l.plinth_cycle.p50_ms,
                    l.plinth_cycle.p95_ms,
                    l.raw_cycle.p50_ms,
                    l.raw_cycle.p95_ms,
                    l.plinth_cycle.p50_ms / l.raw_cycle.p50_ms
                );
            }
        }
        if let Some(p) = &self.parallel {
            let _ = writeln!(
                out,
                "   {}-way parallel {} ({} cycles): plinth {:.1} cycles/s (sequential {:.1}: {:.2}×); raw chain {:.1} cycles/s (sequential {:.1}: {:.2}×)",
                p.workers,
                p.kind.name(),
                p.cycles,
                p.plinth_cycles_per_s,
                p.plinth_sequential_cycles_per_s,
                p.plinth_cycles_per_s / p.plinth_sequential_cycles_per_s,
                p.raw_cycles_per_s,
                p.raw_sequential_cycles_per_s,
                p.raw_cycles_per_s / p.raw_sequential_cycles_per_s
            );
            let _ = writeln!(
                out,
                "   CPUs busy (whole machine, of {}, steal excluded): plinth sequential {:.2} ({:.1} ms of CPU a cycle), parallel {:.2} ({:.1} ms a cycle, {:.0}% of the machine)",
                p.cpus,
                p.plinth_sequential_busy_cpus,
                p.plinth_sequential_busy_cpus / p.plinth_sequential_cycles_per_s * 1e3,
                p.plinth_parallel_busy_cpus,
                p.plinth_parallel_busy_cpus / p.plinth_cycles_per_s * 1e3,
                p.plinth_parallel_busy_cpus / p.cpus as f64 * 100.0
            );
        }
        if let Some(d) = &self.data_path {
            let _ = writeln!(
                out,
                "\n2. Data path: fio, libaio, direct, {} MiB file, {} s runs (+{} s ramp), median of {} alternating runs; {} (dio {})",
                d.setup.file_bytes >> 20,
                d.setup.runtime_s,
                d.setup.ramp_s,
                d.runs,
                d.loop_device,
                if d.direct_io { "on" } else { "OFF" }
            );
            let _ = writeln!(
                out,
                "   {:<18} {:>10} {:>10} {:>6}  {:>7}  {:<21}  {:>10} {:>7}",
                "job", "plinth", "pool fs", "unit", "ratio", "pair ratios (min–max)", "raw block", "ratio"
            );
            for j in &d.jobs {
                let lo = j.pair_ratios.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = j.pair_ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let pairs = format!("{lo:.2}–{hi:.2}");
                let _ = writeln!(
                    out,
                    "   {:<18} {:>10.0} {:>10.0} {:>6}  {:>6.2}×  {pairs:<21}  {:>10.0} {:>6.2}×",
                    j.job.name,
                    j.plinth_median,
                    j.pool_median,
                    j.unit,
                    j.ratio,
                    j.block_median.unwrap_or(f64::NAN),
                    j.block_ratio.unwrap_or(f64::NAN)
                );
            }
            let _ = writeln!(
                out,
                "   raw block: the same job on a published block volume (its loop device, no filesystem inside), against the pool fs"
            );
            let queue: Vec<String> = d.queue.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(out, "   loop queue: {}", queue.join(" "));
        }
        if let Some(knobs) = &self.knobs {
            let _ =
                writeln!(out, "\n   loop queue knobs, one at a time (plinth/pool ratio, median of alternating runs):");
            for k in knobs {
                let jobs: Vec<String> =
                    k.jobs.iter().map(|(name, (_, _, ratio))| format!("{name} {ratio:.2}×")).collect();
                let _ = writeln!(
                    out,
                    "   {:<24} {}{}",
                    k.setting,
                    jobs.join("   "),
                    if k.applied { "" } else { "   (kernel refused)" }
                );
            }
        }
        if let Some(s) = &self.scale {
            let _ = writeln!(
                out,
                "\n3./4. Footprint and scale: {} volumes of 16 MiB, {} staged (ext4)",
                s.volumes, s.staged
            );
            let rss = |r: &crate::scale::Rss| {
                format!(
                    "{:.1} MiB ({:.1} anon + {:.1} file)",
                    r.mib(),
                    r.anon_kib as f64 / 1024.0,
                    r.file_kib as f64 / 1024.0
                )
            };
            let _ = writeln!(out, "   RSS at start {}; idle after a Probe {}", rss(&s.rss_start), rss(&s.rss_idle));
            let _ = writeln!(
                out,
                "   RSS with {} volumes {} (peak {:.1} MiB); restarted on them {}",
                s.volumes,
                rss(&s.rss_full),
                s.rss_full.peak_kib as f64 / 1024.0,
                rss(&s.rss_after_restart)
            );
            let _ = writeln!(
                out,
                "   CreateVolume p50 / p95: at 10 volumes {:.2} / {:.2} ms; at {} {:.2} / {:.2} ms ({:.2}×)",
                s.create_at_10.p50_ms,
                s.create_at_10.p95_ms,
                s.volumes,
                s.create_at_full.p50_ms,
                s.create_at_full.p95_ms,
                s.create_at_full.p50_ms / s.create_at_10.p50_ms
            );
            let _ = writeln!(
                out,
                "   full ListVolumes ({} per page): p50 {:.1} ms, p95 {:.1} ms",
                s.list_page_size, s.list_all.p50_ms, s.list_all.p95_ms
            );
            let _ = writeln!(
                out,
                "   restart → Probe ready: p50 {:.0} ms, max {:.0} ms ({} restarts); fill took {:.1} s",
                s.restart_to_ready.p50_ms,
                s.restart_to_ready.max_ms,
                s.restart_to_ready.samples_ms.len(),
                s.fill_s
            );
        }
        for s in &self.services {
            let _ = writeln!(
                out,
                "\n5. Data services on the {} pool ({}): {} GiB thin image holding {} MiB, CLI wall time, p50 of {}",
                s.pool,
                s.copy_method,
                s.image_bytes >> 30,
                s.data_bytes >> 20,
                s.repetitions
            );
            let _ = writeln!(
                out,
                "   {:<9} {:>10} {:>12} {:>14} {:>8}  {:<27}",
                "operation",
                "plinth ms",
                format!("cp ms"),
                "cp+fsync ms",
                "ratio",
                "pair ratios: median (min–max)"
            );
            for op in &s.operations {
                let pairs = op.pair_ratios();
                let lo = pairs.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = pairs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let pairs = format!("{:.2}× ({lo:.2}–{hi:.2})", crate::stats::median(&pairs));
                let _ = writeln!(
                    out,
                    "   {:<9} {:>10.1} {:>12.1} {:>14.1} {:>7.2}×  {pairs:<27}  (cp {})",
                    op.operation,
                    op.plinth.p50_ms,
                    op.cp.p50_ms,
                    op.cp_fsync.p50_ms,
                    op.plinth.p50_ms / op.cp_fsync.p50_ms,
                    s.cp_flag
                );
            }
        }
        if !self.targets.is_empty() {
            let met = self.targets.iter().filter(|t| t.met).count();
            let _ = writeln!(out, "\nTargets (issue 12): {met} of {} met", self.targets.len());
            for t in &self.targets {
                let _ = writeln!(
                    out,
                    "   {:<6} {:<52} {:<56} goal {}",
                    if t.met { "MET" } else { "MISSED" },
                    t.name,
                    t.measured,
                    t.goal
                );
            }
        }
        let _ = writeln!(out, "\ntook {:.0} s", self.duration_s);
        out
    }
}

/// Seconds since the epoch as an ISO 8601 UTC timestamp (civil-from-days, no time crate).
pub fn utc(seconds: u64) -> String {
    let (days, rest) = ((seconds / 86_400) as i64, seconds % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_764_201_600), "2025-11-27T00:00:00Z");
    }
}
