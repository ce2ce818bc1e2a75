//! The latency plot: one panel per volume kind, the empirical distribution (CDF) of whole-cycle
//! latency for plinth and for the raw tool chain. Hand-written SVG: a few polylines and labels
//! need no plotting crate, and the file stays diffable.

use std::fmt::Write;

use crate::control::Lifecycle;

const PANEL_W: f64 = 460.0;
const PANEL_H: f64 = 290.0;
const MARGIN_L: f64 = 52.0;
const MARGIN_R: f64 = 16.0;
const MARGIN_T: f64 = 30.0;
const MARGIN_B: f64 = 40.0;
const PLINTH: &str = "#1f6fb4";
const RAW: &str = "#e0701a";

/// A tick step of 1, 2 or 5 × 10^n giving about five ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    let rough = (max / 5.0).max(1e-9);
    let magnitude = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|s| *s >= rough).unwrap_or(10.0 * magnitude)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Steps of the empirical CDF of `samples`, in panel coordinates.
fn cdf_points(samples: &[f64], x: impl Fn(f64) -> f64, y: impl Fn(f64) -> f64) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mut points = String::new();
    for (i, value) in sorted.iter().enumerate() {
        let _ =
            write!(points, "{:.1},{:.1} {:.1},{:.1} ", x(*value), y(i as f64 / n), x(*value), y((i + 1) as f64 / n));
    }
    points
}

fn panel(svg: &mut String, lifecycle: &Lifecycle, left: f64, top: f64) {
    let (plinth, raw) = (&lifecycle.plinth_cycle, &lifecycle.raw_cycle);
    let max = plinth.max_ms.max(raw.max_ms).max(1.0) * 1.05;
    let step = tick_step(max);
    let max = (max / step).ceil() * step;
    let (x0, y0) = (left + MARGIN_L, top + PANEL_H - MARGIN_B);
    let (width, height) = (PANEL_W - MARGIN_L - MARGIN_R, PANEL_H - MARGIN_T - MARGIN_B);
    let x = |v: f64| x0 + v / max * width;
    let y = |p: f64| y0 - p * height;
    let _ = write!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" font-weight="bold">{} — lifecycle, {} cycles each</text>"#,
        left + MARGIN_L,
        top + 18.0,
        lifecycle.kind.name(),
        lifecycle.cycles
    );
    let _ = write!(
        svg,
        r##"<rect x="{x0:.1}" y="{:.1}" width="{width:.1}" height="{height:.1}" fill="none" stroke="#999"/>"##,
        y(1.0)
    );
    let mut tick = 0.0;
    while tick <= max + step / 2.0 {
        let _ = write!(
            svg,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#e4e4e4"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle" font-size="11">{4}</text>"##,
            x(tick),
            y(0.0),
            y(1.0),
            y0 + 15.0,
            if step >= 1.0 { format!("{tick:.0}") } else { format!("{tick:.1}") }
        );
        tick += step;
    }
    for p in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = write!(
            svg,
            r##"<line x1="{x0:.1}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#e4e4e4"/><text x="{2:.1}" y="{3:.1}" text-anchor="end" font-size="11">{4}%</text>"##,
            y(p),
            x0 + width,
            x0 - 5.0,
            y(p) + 4.0,
            (p * 100.0) as u32
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">cycle latency (ms)</text>"#,
        x0 + width / 2.0,
        y0 + 31.0
    );
    for (samples, colour) in [(&raw.samples_ms, RAW), (&plinth.samples_ms, PLINTH)] {
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            cdf_points(samples, x, y)
        );
    }
    let legend = [
        (PLINTH, format!("plinth  p50 {:.1} ms  p95 {:.1} ms", plinth.p50_ms, plinth.p95_ms)),
        (RAW, format!("raw chain  p50 {:.1} ms  p95 {:.1} ms", raw.p50_ms, raw.p95_ms)),
    ];
    for (i, (colour, text)) in legend.iter().enumerate() {
        let ly = y(0.18) - i as f64 * 16.0;
        let lx = x0 + width * 0.42;
        let _ = write!(
            svg,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            lx + 18.0,
            lx + 23.0,
            ly + 4.0,
            escape(text)
        );
    }
}

/// The SVG document: panels two per row, a title with `caption`.
pub fn latency_svg(lifecycles: &[Lifecycle], caption: &str) -> String {
    let rows = lifecycles.len().div_ceil(2).max(1);
    let (width, height) = (2.0 * PANEL_W, rows as f64 * PANEL_H + 40.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13"><rect width="100%" height="100%" fill="white"/><text x="12" y="22" font-size="14">{}</text>"#,
        escape(caption)
    );
    for (i, lifecycle) in lifecycles.iter().enumerate() {
        panel(&mut svg, lifecycle, (i % 2) as f64 * PANEL_W, 30.0 + (i / 2) as f64 * PANEL_H);
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(tick_step(50.0), 10.0);
        assert_eq!(tick_step(23.0), 5.0);
        assert_eq!(tick_step(7.0), 2.0);
        assert_eq!(tick_step(0.4), 0.1);
    }
}
