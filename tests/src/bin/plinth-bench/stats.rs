//! Order statistics over samples. Medians and percentiles rather than means: this VM's I/O and
//! CPU are shared, and one stall must not move a figure.

use std::time::Duration;

use serde::Serialize;

/// The `p`-th percentile (0–100) of `values` by linear interpolation between closest ranks;
/// `NaN` for no values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Summary of latency samples in milliseconds; the samples are kept for the plot and the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub samples_ms: Vec<f64>,
}

impl Latency {
    pub fn of(samples_ms: Vec<f64>) -> Self {
        Self {
            p50_ms: median(&samples_ms),
            p95_ms: percentile(&samples_ms, 95.0),
            min_ms: percentile(&samples_ms, 0.0),
            max_ms: percentile(&samples_ms, 100.0),
            samples_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let values = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(median(&values), 2.5);
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile(&values, 100.0), 4.0);
        assert!((percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 95.0) - 4.8).abs() < 1e-9);
        assert!(median(&[]).is_nan());
    }
}
