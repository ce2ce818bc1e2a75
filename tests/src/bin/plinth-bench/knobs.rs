//! The loop device's queue knobs, one at a time: each is set on the published fio volume's loop
//! device (everything else at the kernel's defaults for a loop device), and the 4k jobs run
//! against the pool filesystem as in the data-path section. What each knob gave goes into
//! BENCHMARKS.md; plinth sets at attach time only what helped.

use std::collections::BTreeMap;

use anyhow::Context;
use plinth_engine::sys::loopdev::LoopDevice;
use plinth_tests::Sandbox;
use serde::Serialize;

use crate::args;
use crate::data::{self, QUEUE_KNOBS, Targets};
use crate::fio::{self, Setup};
use crate::tools::run;

/// Candidate values per knob (the kernel's own defaults are read off a fresh loop device).
const CANDIDATES: &[(&str, &[&str])] = &[
    ("nr_requests", &["32", "64", "256"]),
    ("max_sectors_kb", &["128", "512"]),
    ("read_ahead_kb", &["0", "128"]),
    ("nomerges", &["1", "2"]),
    ("iostats", &["0"]),
    ("scheduler", &["mq-deadline"]),
    ("rq_affinity", &["0", "2"]),
    ("wbt_lat_usec", &["0"]),
    ("rotational", &["0"]),
];

#[derive(Debug, Clone, Serialize)]
pub struct KnobResult {
    /// "kernel defaults", "as plinth attaches", or "knob=value".
    pub setting: String,
    /// Whether the kernel accepted the value (some are capped by the device's limits).
    pub applied: bool,
    /// Job name → (plinth median, pool median, ratio).
    pub jobs: BTreeMap<String, (f64, f64, f64)>,
}

/// The queue settings of a loop device the harness attaches itself, the way losetup does.
fn kernel_defaults(sandbox: &Sandbox) -> anyhow::Result<BTreeMap<String, String>> {
    let image = sandbox.path().join("defaults.img");
    run("truncate", args!["-s", "64M", image])?;
    let (output, _) = run("losetup", args!["--direct-io=on", "--sector-size", "4096", "--find", "--show", image])?;
    let device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let number = device.trim_start_matches("/dev/loop").parse().context("losetup printed no loop device")?;
    let defaults = data::queue_settings(LoopDevice { number });
    run("losetup", args!["-d", device])?;
    std::fs::remove_file(&image)?;
    // sysfs shows the scheduler as "[none] mq-deadline …": keep the selected one.
    Ok(defaults.into_iter().map(|(k, v)| (k, selected(&v))).collect())
}

fn selected(value: &str) -> String {
    match (value.find('['), value.find(']')) {
        (Some(open), Some(close)) if open < close => value[open + 1..close].to_owned(),
        _ => value.to_owned(),
    }
}

/// Sets one queue attribute; whether the kernel took the value.
fn set(device: LoopDevice, knob: &str, value: &str) -> bool {
    let path = format!("/sys/block/loop{}/queue/{knob}", device.number);
    std::fs::write(&path, value).is_ok() && selected(std::fs::read_to_string(&path).unwrap_or_default().trim()) == value
}

fn apply(device: LoopDevice, settings: &BTreeMap<String, String>) -> bool {
    // The scheduler first: switching it resets nr_requests.
    let mut ok = settings.get("scheduler").is_none_or(|s| set(device, "scheduler", s));
    for knob in QUEUE_KNOBS.iter().filter(|k| **k != "scheduler") {
        if let Some(value) = settings.get(*knob) {
            ok &= set(device, knob, value);
        }
    }
    ok
}

async fn measure(targets: &Targets, setup: &Setup, runs: usize) -> anyhow::Result<BTreeMap<String, (f64, f64, f64)>> {
    let mut jobs = BTreeMap::new();
    for job in fio::JOBS.iter().filter(|j| j.block_size == "4k") {
        let result = data::compare(*job, targets, setup, runs, false).await?;
        jobs.insert(job.name.to_owned(), (result.plinth_median, result.pool_median, result.ratio));
    }
    Ok(jobs)
}

/// Every knob setting in turn, then plinth's own settings back.
pub async fn ablation(
    targets: &Targets,
    sandbox: &Sandbox,
    setup: &Setup,
    runs: usize,
) -> anyhow::Result<Vec<KnobResult>> {
    let device = targets.device;
    let plinth: BTreeMap<String, String> =
        data::queue_settings(device).into_iter().map(|(k, v)| (k, selected(&v))).collect();
    let defaults = kernel_defaults(sandbox)?;
    let mut settings: Vec<(String, BTreeMap<String, String>)> =
        vec![("kernel defaults".into(), defaults.clone()), ("as plinth attaches".into(), plinth.clone())];
    for (knob, values) in CANDIDATES {
        for value in values.iter().filter(|v| defaults.get(*knob).is_none_or(|d| d != *v)) {
            let mut changed = defaults.clone();
            changed.insert(knob.to_string(), value.to_string());
            settings.push((format!("{knob}={value}"), changed));
        }
    }
    let mut results = Vec::new();
    for (setting, values) in settings {
        let applied = apply(device, &values);
        let jobs = measure(targets, setup, runs).await?;
        let line: Vec<String> = jobs.iter().map(|(name, (_, _, ratio))| format!("{name} ×{ratio:.2}")).collect();
        eprintln!("  {setting:<24} {}{}", line.join("  "), if applied { "" } else { "  (not applied)" });
        results.push(KnobResult { setting, applied, jobs });
    }
    apply(device, &plinth);
    Ok(results)
}
