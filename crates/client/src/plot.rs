//! `--plot FILE.svg`: the latency distribution (a percentile curve on the
//! usual "nines" axis) above the throughput per 100 ms bucket. Plain SVG,
//! written by hand: two line charts need no plotting library.

use std::fmt::Write as _;

use crate::report::{human_ns, Setup, Tally, BUCKET_NS};

const WIDTH: f64 = 900.0;
const PANEL: f64 = 300.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 70.0;
const GAP: f64 = 80.0;

/// The deepest percentile drawn: 99.999%.
const MAX_NINES: f64 = 5.0;

/// Renders the plot as an SVG document.
pub fn render_svg(setup: &Setup, t: &Tally) -> String {
    let height = TOP + 2.0 * PANEL + GAP + 50.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let lines = [
        format!(
            "loadgen -> {}: {} loop, {} socket(s) x {} process(es), mix {}",
            setup.servers.join(", "),
            setup.mode,
            setup.sockets,
            setup.processes,
            setup.mix
        ),
        format!(
            "{:.0} replies/s, p50 {}, p99 {}, max {}, lost {} of {}",
            t.throughput(),
            human_ns(t.latency_at(50.0)),
            human_ns(t.latency_at(99.0)),
            human_ns(t.latency_ns.max()),
            t.lost,
            t.sent
        ),
    ];
    for (i, line) in lines.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="14">{}</text>"#,
            WIDTH / 2.0,
            20.0 + 18.0 * i as f64,
            escape(line)
        );
    }
    latency_panel(&mut svg, t, TOP);
    throughput_panel(&mut svg, t, TOP + PANEL + GAP);
    svg.push_str("</svg>\n");
    svg
}

/// The latency at each depth `x` of the nines axis (`x` = 2 is p99).
fn latency_curve(t: &Tally) -> Vec<(f64, f64)> {
    if t.latency_ns.is_empty() {
        return Vec::new();
    }
    // Beyond 1/count the percentiles all read the maximum: stop there.
    let deepest = (t.latency_ns.len() as f64).log10().clamp(1.0, MAX_NINES);
    let steps = 200;
    (0..=steps)
        .map(|i| {
            let x = deepest * f64::from(i) / f64::from(steps);
            let q = 100.0 * (1.0 - 10f64.powf(-x));
            (x, t.latency_ns.value_at_percentile(q) as f64 / 1e6)
        })
        .collect()
}

fn latency_panel(svg: &mut String, t: &Tally, top: f64) {
    let curve = latency_curve(t);
    let x_max = curve.last().map_or(MAX_NINES, |p| p.0.ceil().max(1.0));
    let y_max = nice_ceiling(curve.iter().map(|p| p.1).fold(0.0, f64::max));
    let frame = Frame { top, x_max, y_max };
    frame.axes(svg, "latency (ms) by percentile", "percentile");
    for k in 0..=x_max as u32 {
        let label = match k {
            0 => "0%".to_string(),
            1 => "90%".to_string(),
            k => format!("99.{}%", "9".repeat(k as usize - 2)).replace("99.%", "99%"),
        };
        frame.x_tick(svg, f64::from(k), &label);
    }
    frame.y_ticks(svg);
    frame.polyline(svg, &curve, "#1f77b4");
}

fn throughput_panel(svg: &mut String, t: &Tally, top: f64) {
    let per_s = 1e9 / BUCKET_NS as f64;
    let points: Vec<(f64, f64)> = t
        .buckets
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            // A step per bucket: flat across its 100 ms.
            let x0 = i as f64 * BUCKET_NS as f64 / 1e9;
            let x1 = (i + 1) as f64 * BUCKET_NS as f64 / 1e9;
            let y = *n as f64 * per_s;
            [(x0, y), (x1, y)]
        })
        .collect();
    let x_max = nice_ceiling(points.last().map_or(1.0, |p| p.0));
    let y_max = nice_ceiling(points.iter().map(|p| p.1).fold(0.0, f64::max));
    let frame = Frame { top, x_max, y_max };
    frame.axes(svg, "throughput (replies/s per 100 ms)", "time (s)");
    let step = nice_step(x_max);
    let mut x = 0.0;
    while x <= x_max + step / 1e6 {
        frame.x_tick(svg, x, &trim_float(x));
        x += step;
    }
    frame.y_ticks(svg);
    frame.polyline(svg, &points, "#d62728");
}

/// One chart's plotting area and scales.
struct Frame {
    top: f64,
    x_max: f64,
    y_max: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + (WIDTH - LEFT - RIGHT) * x / self.x_max
    }

    fn py(&self, y: f64) -> f64 {
        self.top + PANEL - PANEL * y / self.y_max
    }

    fn axes(&self, svg: &mut String, title: &str, x_label: &str) {
        let (x0, x1) = (LEFT, WIDTH - RIGHT);
        let (y0, y1) = (self.top, self.top + PANEL);
        let _ = writeln!(
            svg,
            r##"<rect x="{x0}" y="{y0}" width="{}" height="{PANEL}" fill="none" stroke="#444"/>"##,
            x1 - x0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{x0}" y="{}" font-size="13">{}</text>"#,
            y0 - 8.0,
            escape(title)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            y1 + 36.0,
            escape(x_label)
        );
    }

    fn x_tick(&self, svg: &mut String, x: f64, label: &str) {
        let px = self.px(x);
        let y1 = self.top + PANEL;
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{y1}" stroke="#ddd"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            self.top,
            y1 + 16.0,
            escape(label)
        );
    }

    fn y_ticks(&self, svg: &mut String) {
        let step = nice_step(self.y_max);
        let mut y = 0.0;
        while y <= self.y_max + step / 1e6 {
            let py = self.py(y);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                WIDTH - RIGHT,
                LEFT - 6.0,
                py + 4.0,
                trim_float(y)
            );
            y += step;
        }
    }

    fn polyline(&self, svg: &mut String, points: &[(f64, f64)], color: &str) {
        if points.is_empty() {
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="middle">no data</text>"#,
                WIDTH / 2.0,
                self.top + PANEL / 2.0
            );
            return;
        }
        let mut d = String::new();
        for (x, y) in points {
            let _ = write!(d, "{:.1},{:.1} ", self.px(*x), self.py(*y));
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            d.trim_end()
        );
    }
}

/// A round number (1, 2 or 5 times a power of ten) at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let step = nice_step(v);
    (v / step).ceil() * step
}

/// A round tick step giving about five ticks up to `v`.
fn nice_step(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let raw = v / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// `2` rather than `2.0`, `0.25` rather than `0.25000000001`.
fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.to_string()
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
    fn round_numbers() {
        assert_eq!(nice_step(10.0), 2.0);
        assert_eq!(nice_step(0.7), 0.2);
        assert_eq!(nice_ceiling(0.83), 1.0);
        assert_eq!(nice_ceiling(123_456.0), 150_000.0);
        assert_eq!(trim_float(0.25), "0.25");
        assert_eq!(trim_float(2.0), "2");
    }

    #[test]
    fn svg_has_both_panels() {
        let mut t = Tally {
            sent: 1000,
            send_ns: 1_000_000_000,
            ..Tally::default()
        };
        for i in 0..1000u64 {
            t.answer(i * 1_000_000, 50_000 + i * 100);
        }
        let setup = Setup {
            servers: vec!["127.0.0.1:1".into()],
            policy: "first",
            retries: 0,
            mode: "closed",
            window: Some(1),
            rate: None,
            sockets: 1,
            processes: 1,
            mix: "square=100".into(),
            timeout_ms: 1000,
        };
        let svg = render_svg(&setup, &t);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">99.9%<"));
        assert!(svg.contains("-&gt; 127.0.0.1:1"));
    }
}
