//! fio (the Debian package) jobs and their JSON results.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::args;
use crate::tools::run;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Metric {
    Iops,
    MegabytesPerSecond,
}

impl Metric {
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Iops => "IOPS",
            Metric::MegabytesPerSecond => "MB/s",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Job {
    pub name: &'static str,
    pub rw: &'static str,
    pub block_size: &'static str,
    pub iodepth: u32,
    pub metric: Metric,
}

impl Job {
    fn writes(&self) -> bool {
        self.rw.contains("write")
    }
}

/// The issue's four jobs: 4k random read and write at QD32 (IOPS), 1 MiB sequential read and
/// write (MB/s); all direct I/O through libaio.
pub const JOBS: [Job; 4] = [
    Job { name: "randread-4k-qd32", rw: "randread", block_size: "4k", iodepth: 32, metric: Metric::Iops },
    Job { name: "randwrite-4k-qd32", rw: "randwrite", block_size: "4k", iodepth: 32, metric: Metric::Iops },
    Job { name: "read-1m-qd8", rw: "read", block_size: "1M", iodepth: 8, metric: Metric::MegabytesPerSecond },
    Job { name: "write-1m-qd8", rw: "write", block_size: "1M", iodepth: 8, metric: Metric::MegabytesPerSecond },
];

/// How long each measured run lasts, and the file it works on.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Setup {
    pub file_bytes: u64,
    pub runtime_s: u32,
    pub ramp_s: u32,
}

/// Writes the whole test file once, so every measured run finds its blocks allocated (in the pool
/// filesystem and inside the volume alike): the runs then measure steady-state I/O, not
/// allocation.
pub fn prefill(file: &Path, setup: &Setup) -> anyhow::Result<()> {
    let size = setup.file_bytes.to_string();
    run(
        "fio",
        args![
            "--name=prefill",
            format!("--filename={}", file.display()),
            format!("--size={size}"),
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--ioengine=libaio",
            "--direct=1",
            "--end_fsync=1",
            "--output-format=json",
        ],
    )
    .with_context(|| format!("laying out {}", file.display()))?;
    Ok(())
}

/// One run of `job` on `file`; its figure in the job's metric.
pub fn measure(job: &Job, file: &Path, setup: &Setup) -> anyhow::Result<f64> {
    let (output, _) = run(
        "fio",
        args![
            format!("--name={}", job.name),
            format!("--filename={}", file.display()),
            format!("--size={}", setup.file_bytes),
            format!("--rw={}", job.rw),
            format!("--bs={}", job.block_size),
            format!("--iodepth={}", job.iodepth),
            "--ioengine=libaio",
            "--direct=1",
            "--time_based",
            format!("--runtime={}", setup.runtime_s),
            format!("--ramp_time={}", setup.ramp_s),
            "--output-format=json",
        ],
    )
    .with_context(|| format!("fio {} on {}", job.name, file.display()))?;
    parse(job, &output.stdout)
}

fn parse(job: &Job, stdout: &[u8]) -> anyhow::Result<f64> {
    let report: serde_json::Value = serde_json::from_slice(stdout).context("parsing fio's JSON output")?;
    let side = &report["jobs"][0][if job.writes() { "write" } else { "read" }];
    let value = match job.metric {
        Metric::Iops => side["iops"].as_f64(),
        Metric::MegabytesPerSecond => side["bw_bytes"].as_f64().map(|b| b / 1e6),
    };
    value.with_context(|| format!("fio's report has no {} figure", job.metric.unit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_figure_of_the_jobs_direction() {
        let report = br#"{"jobs":[{"read":{"iops":1000.5,"bw_bytes":0},"write":{"iops":7.0,"bw_bytes":2000000}}]}"#;
        assert_eq!(parse(&JOBS[0], report).unwrap(), 1000.5);
        assert_eq!(parse(&JOBS[1], report).unwrap(), 7.0);
        assert_eq!(parse(&JOBS[3], report).unwrap(), 2.0);
    }
}
