//! What a replay prints and draws: per policy, executor-seconds, TTFT percentiles, the share of
//! requests within the TTFT objective, requests refused or timed out, scale-ups, scale-downs
//! and flaps (as a table or JSON), and an SVG with one panel per policy: requests in the system,
//! desired and ready executors, the demand in executors, and the oldest queued request's wait.

use std::fmt::Write;

use serde::Serialize;

use super::sim::{Fate, Outcome, Point};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub policy: String,
    pub requests: usize,
    pub executor_seconds: f64,
    pub ttft_p50_s: f64,
    pub ttft_p90_s: f64,
    pub ttft_p99_s: f64,
    /// Share of all requests (refused and timed out count as misses) whose TTFT met the SLO.
    pub slo_attainment: f64,
    pub slo_ttft_s: f64,
    pub refused: usize,
    pub timed_out: usize,
    pub scale_ups: u32,
    pub scale_downs: u32,
    pub flaps: u32,
    pub executors_launched: u32,
    pub peak_ready: u32,
    /// Simulated seconds until the last request ended.
    pub duration_s: f64,
}

/// The `q` quantile (0..=1) of sorted values, nearest rank; 0 when empty.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Summary {
    pub fn of(policy: &str, o: &Outcome, slo: f64) -> Self {
        let mut ttft: Vec<f64> = o
            .fates
            .iter()
            .filter_map(|f| match f {
                Fate::Served { ttft } => Some(*ttft),
                _ => None,
            })
            .collect();
        ttft.sort_by(f64::total_cmp);
        let count = |want: fn(&Fate) -> bool| o.fates.iter().filter(|f| want(f)).count();
        let within = ttft.iter().filter(|&&t| t <= slo).count();
        Self {
            policy: policy.to_owned(),
            requests: o.fates.len(),
            executor_seconds: o.executor_seconds,
            ttft_p50_s: quantile(&ttft, 0.50),
            ttft_p90_s: quantile(&ttft, 0.90),
            ttft_p99_s: quantile(&ttft, 0.99),
            slo_attainment: within as f64 / o.fates.len().max(1) as f64,
            slo_ttft_s: slo,
            refused: count(|f| matches!(f, Fate::Refused)),
            timed_out: count(|f| matches!(f, Fate::TimedOut)),
            scale_ups: o.scale_ups,
            scale_downs: o.scale_downs,
            flaps: o.flaps,
            executors_launched: o.launched,
            peak_ready: o.timeline.iter().map(|p| p.ready).max().unwrap_or(0),
            duration_s: o.end,
        }
    }
}

/// The table the command prints.
pub fn table(rows: &[Summary], trace: &str, requests: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "trace {trace}: {requests} requests");
    let _ = writeln!(
        out,
        "{:<12} {:>10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>6} {:>5} {:>5} {:>5} {:>5}",
        "policy",
        "exec-s",
        "ttft50",
        "ttft90",
        "ttft99",
        "slo",
        "refused",
        "t/out",
        "ups",
        "downs",
        "flaps",
        "peak"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<12} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>6.2}% {:>7} {:>6} {:>5} {:>5} {:>5} {:>5}",
            r.policy,
            r.executor_seconds,
            r.ttft_p50_s,
            r.ttft_p90_s,
            r.ttft_p99_s,
            100.0 * r.slo_attainment,
            r.refused,
            r.timed_out,
            r.scale_ups,
            r.scale_downs,
            r.flaps,
            r.peak_ready
        );
    }
    let _ = writeln!(
        out,
        "(slo: share of requests with TTFT <= {} s)",
        rows.first().map_or(0.0, |r| r.slo_ttft_s)
    );
    out
}

const WIDTH: f64 = 1000.0;
const PANEL: f64 = 260.0;
const MARGIN: f64 = 50.0;

/// An SVG with one panel per policy (two plots each: executors and requests; queue wait).
pub fn plot(panels: &[(String, Vec<Point>)]) -> String {
    let height = MARGIN + panels.len() as f64 * (2.0 * PANEL + MARGIN);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let t_max = panels
        .iter()
        .flat_map(|(_, p)| p.last().map(|p| p.t))
        .fold(1.0_f64, f64::max);
    for (i, (name, points)) in panels.iter().enumerate() {
        let top = MARGIN + i as f64 * (2.0 * PANEL + MARGIN);
        let executors_max = points
            .iter()
            .map(|p| p.desired.max(p.ready) as f64)
            .chain(points.iter().map(|p| p.demand_executors))
            .fold(1.0, f64::max);
        chart(
            &mut svg,
            top,
            &format!(
                "{name}: executors (desired, ready, demand in executors) and requests in system (right axis)"
            ),
            t_max,
            &[
                ("desired", "#d62728", executors_max, &|p: &Point| {
                    p.desired as f64
                }),
                ("ready", "#2ca02c", executors_max, &|p: &Point| {
                    p.ready as f64
                }),
                (
                    "demand (executors)",
                    "#1f77b4",
                    executors_max,
                    &|p: &Point| p.demand_executors,
                ),
                (
                    "requests in system",
                    "#bbbbbb",
                    points.iter().map(|p| p.demand as f64).fold(1.0, f64::max),
                    &|p: &Point| p.demand as f64,
                ),
            ],
            points,
        );
        chart(
            &mut svg,
            top + PANEL,
            &format!("{name}: oldest queued request's wait (s)"),
            t_max,
            &[(
                "queue wait",
                "#9467bd",
                points.iter().map(|p| p.queue_wait).fold(1.0, f64::max),
                &|p: &Point| p.queue_wait,
            )],
            points,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

type Series<'a> = (&'a str, &'a str, f64, &'a dyn Fn(&Point) -> f64);

/// One chart: axes, the first series' scale on the left (the last's on the right when it
/// differs), a polyline per series and a legend.
fn chart(
    svg: &mut String,
    top: f64,
    title: &str,
    t_max: f64,
    series: &[Series<'_>],
    points: &[Point],
) {
    let (left, right) = (MARGIN, WIDTH - MARGIN);
    let (y0, y1) = (top + 25.0, top + PANEL - 30.0);
    let x = |t: f64| left + (right - left) * t / t_max;
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{}" font-weight="bold">{}</text>"#,
        top + 15.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r#"<path d="M{left},{y0} L{left},{y1} L{right},{y1} L{right},{y0}" fill="none" stroke="black"/>"#
    );
    for k in 0..=4 {
        let t = t_max * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{:.0} s</text>"#,
            x(t),
            y1 + 15.0,
            t
        );
    }
    let (first, last) = (series[0].2, series[series.len() - 1].2);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{y0}" text-anchor="end">{first:.1}</text>"#,
        left - 4.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{y1}" text-anchor="end">0</text>"#,
        left - 4.0
    );
    if (first - last).abs() > f64::EPSILON {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{y0}">{last:.0}</text>"#,
            right + 4.0
        );
    }
    // At most one vertex per pixel column: each bucket of points drawn at its largest value,
    // so spikes survive the thinning.
    let per_bucket = points.len().div_ceil((right - left) as usize).max(1);
    for (k, (label, color, max, value)) in series.iter().enumerate() {
        let mut d = String::new();
        for (j, bucket) in points.chunks(per_bucket).enumerate() {
            let v = bucket.iter().map(value).fold(f64::MIN, f64::max);
            let y = y1 - (y1 - y0) * (v / max).clamp(0.0, 1.0);
            let step = if j == 0 { "M" } else { " L" };
            let _ = write!(d, "{step}{:.1},{:.1}", x(bucket[0].t), y);
        }
        let _ = writeln!(
            svg,
            r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="1.2"/>"#
        );
        let lx = left + 10.0 + 190.0 * k as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{lx}" y="{:.1}" width="12" height="3" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            y0 + 8.0,
            lx + 16.0,
            y0 + 12.0,
            escape(label)
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
