//! Line charts as inline SVG, drawn in Rust so the report renders with JavaScript disabled.

use std::fmt::{self, Write};

use super::format::{Escape, number};

/// Width of the drawing in SVG user units; the page scales it to fit.
const WIDTH: f64 = 640.0;
/// Height of the plot area alone.
const PLOT_HEIGHT: f64 = 200.0;
/// Room for the y tick labels.
const LEFT: f64 = 62.0;
const RIGHT: f64 = 16.0;
/// Room for the x tick labels and the axis title.
const BOTTOM: f64 = 40.0;
/// Height of one legend line.
const LEGEND_LINE: f64 = 18.0;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label and `data-series` value.
    pub name: String,
    /// Stroke colour (a CSS colour we choose, never user input).
    pub color: &'static str,
    /// Draw dashed, to tell apart two series of one colour (a service's rx and tx).
    pub dashed: bool,
    /// `(x, y)` points, oldest first; non-finite values break the line.
    pub points: Vec<(f64, f64)>,
}

/// A time chart: x is seconds since the start of the run.
#[derive(Debug, Clone)]
pub struct LineChart<'a> {
    /// `data-chart` value, e.g. `latency`.
    pub key: &'a str,
    /// Caption, for screen readers.
    pub title: &'a str,
    /// Unit of the y axis, e.g. `ms`.
    pub y_unit: &'a str,
    /// Lines to draw.
    pub series: Vec<Series>,
}

/// Round, evenly spaced axis values.
#[derive(Debug, Clone, PartialEq)]
pub struct Ticks {
    /// Distance between two ticks.
    pub step: f64,
    /// Tick values, ascending; the first is ≤ the range's low end, the last ≥ its high end.
    pub values: Vec<f64>,
}

/// Ticks covering `[lo, hi]` with about `target` intervals at steps of 1, 2 or 5 × 10ⁿ.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Ticks {
    let (lo, hi) = sane_range(lo, hi);
    covering(lo, hi, nice_step((hi - lo) / target.max(1) as f64))
}

/// Like [`nice_ticks`], but for seconds: steps of 15 s, 30 s, 1 min, 5 min… read better than
/// 20 s or 500 s.
pub fn time_ticks(lo: f64, hi: f64, target: usize) -> Ticks {
    const STEPS: [f64; 15] = [
        5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 10800.0,
        21600.0, 43200.0,
    ];
    let (lo, hi) = sane_range(lo, hi);
    let raw = (hi - lo) / target.max(1) as f64;
    let step = if raw <= 2.0 {
        nice_step(raw)
    } else {
        STEPS
            .iter()
            .copied()
            .find(|&s| s >= raw)
            .unwrap_or_else(|| nice_step(raw / 86400.0) * 86400.0)
    };
    covering(lo, hi, step)
}

/// Replaces an empty, inverted or non-finite range with one that can be divided.
fn sane_range(lo: f64, hi: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() || !(hi - lo).is_finite() || hi < lo {
        return (0.0, 1.0);
    }
    if hi > lo {
        return (lo, hi);
    }
    // One value (a single point, all-zero data): give it room on both sides but keep zero as
    // the baseline for positive values, since every series here is a non-negative quantity.
    let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.5 };
    let low = if lo >= 0.0 {
        (lo - pad).max(0.0)
    } else {
        lo - pad
    };
    (low, hi + pad)
}

fn nice_step(raw: f64) -> f64 {
    if !raw.is_finite() || raw <= 0.0 {
        return 1.0;
    }
    // powi keeps 10⁻ⁿ as close to exact as a float allows (powf drifts by an ulp or two).
    let magnitude = 10f64.powi(raw.log10().floor() as i32);
    let nice = match raw / magnitude {
        n if n <= 1.0 => 1.0,
        n if n <= 2.0 => 2.0,
        n if n <= 5.0 => 5.0,
        _ => 10.0,
    };
    let step = nice * magnitude;
    // Subnormal ranges underflow the magnitude to zero.
    if step.is_finite() && step > 0.0 {
        step
    } else {
        1.0
    }
}

fn covering(lo: f64, hi: f64, step: f64) -> Ticks {
    // Multiples of the step computed from integers, not by repeated addition, so 0.1 + 0.2
    // drift never shows up in a label; the cap guards against a degenerate step.
    let first = (lo / step).floor();
    let last = (hi / step).ceil();
    let count = ((last - first) as usize).min(100);
    let values = (0..=count)
        .map(|i| {
            let v = (first + i as f64) * step;
            if v == 0.0 { 0.0 } else { v }
        })
        .collect();
    Ticks { step, values }
}

/// Fraction digits that tell ticks `step` apart.
fn step_decimals(step: f64) -> usize {
    if step >= 1.0 || !step.is_finite() || step <= 0.0 {
        0
    } else {
        // Steps are 1, 2 or 5 × 10ⁿ, so −n digits are exact.
        (-step.log10().floor()) as usize
    }
}

/// Labels for y ticks: `1,500`, `0.25`, or SI-abbreviated once values get long (`12k`, `1.5M`).
pub fn tick_labels(ticks: &Ticks) -> Vec<String> {
    let top = ticks.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (divisor, suffix) = match top {
        t if t >= 1e12 => (1e12, "T"),
        t if t >= 1e9 => (1e9, "G"),
        t if t >= 1e6 => (1e6, "M"),
        t if t >= 1e4 => (1e3, "k"),
        _ => (1.0, ""),
    };
    let decimals = step_decimals(ticks.step / divisor);
    ticks
        .values
        .iter()
        .map(|&v| {
            if v == 0.0 {
                "0".to_owned()
            } else {
                format!("{}{suffix}", number(v / divisor, decimals))
            }
        })
        .collect()
}

/// Label for an x tick in seconds: `45s`, `5m`, `1h30m`.
pub fn time_label(secs: f64, step: f64) -> String {
    if step >= 60.0 && secs.fract() == 0.0 && secs % 60.0 == 0.0 {
        let minutes = (secs / 60.0) as i64;
        return match (minutes / 60, minutes % 60) {
            (0, m) => format!("{m}m"),
            (h, 0) => format!("{h}h"),
            (h, m) => format!("{h}h{m:02}m"),
        };
    }
    format!("{}s", number(secs, step_decimals(step)))
}

/// Maps data values onto the plot area.
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
    top: f64,
    width: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0) * self.width
    }

    fn py(&self, y: f64) -> f64 {
        self.top + PLOT_HEIGHT - (y - self.y.0) / (self.y.1 - self.y.0) * PLOT_HEIGHT
    }
}

impl LineChart<'_> {
    /// Appends the chart's `<svg class="chart">` to `out`.
    pub fn render(&self, out: &mut String) -> fmt::Result {
        let legend = self.legend_layout();
        let lines = legend.last().map_or(1.0, |item| item.1 + 1.0);
        let top = 10.0 + lines * LEGEND_LINE + 6.0;
        let height = top + PLOT_HEIGHT + BOTTOM;
        let width = WIDTH - LEFT - RIGHT;
        let finite = |&&(x, y): &&(f64, f64)| x.is_finite() && y.is_finite();
        let all = || {
            self.series
                .iter()
                .flat_map(|s| s.points.iter().filter(finite))
        };
        let has_data = all().next().is_some();

        // x starts at zero: it is "seconds since start", and the first point is the end of
        // the first interval. y includes zero so that small wiggles do not look like cliffs.
        let (x_lo, x_hi) = all().fold((0.0f64, f64::MIN), |(lo, hi), &(x, _)| {
            (lo.min(x), hi.max(x))
        });
        let (y_lo, y_hi) = all().fold((0.0f64, 0.0f64), |(lo, hi), &(_, y)| (lo.min(y), hi.max(y)));
        let x_ticks = time_ticks(x_lo, x_hi, 8);
        let y_ticks = nice_ticks(y_lo, y_hi, 5);
        let (x_lo, x_hi) = sane_range(x_lo, x_hi);
        let y_range = match (y_ticks.values.first(), y_ticks.values.last()) {
            (Some(&lo), Some(&hi)) if hi > lo => (lo, hi),
            _ => (0.0, 1.0),
        };
        let frame = Frame {
            x: (x_lo, x_hi),
            y: y_range,
            top,
            width,
        };

        write!(
            out,
            r#"<svg class="chart" data-chart="{key}" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{title}" data-unit="{unit}" data-x0="{x0}" data-x1="{x1}" data-y0="{y0}" data-y1="{y1}" data-left="{LEFT}" data-top="{top}" data-width="{width}" data-height="{PLOT_HEIGHT}">"#,
            key = Escape(self.key),
            title = Escape(self.title),
            unit = Escape(self.y_unit),
            x0 = frame.x.0,
            x1 = frame.x.1,
            y0 = frame.y.0,
            y1 = frame.y.1,
        )?;
        self.write_legend(out, &legend)?;
        write!(
            out,
            r#"<rect class="plot" x="{LEFT}" y="{top}" width="{width}" height="{PLOT_HEIGHT}"/>"#
        )?;
        if !has_data {
            let (cx, cy) = (LEFT + width / 2.0, top + PLOT_HEIGHT / 2.0);
            write!(
                out,
                r#"<text class="no-data" x="{cx}" y="{cy}" text-anchor="middle">no data</text></svg>"#
            )?;
            return Ok(());
        }
        write_axes(out, &frame, &x_ticks, &y_ticks, self.y_unit)?;
        for series in &self.series {
            write_series(out, &frame, series)?;
        }
        out.push_str("</svg>");
        Ok(())
    }

    /// Each legend item's x offset and line number, wrapping when a line is full.
    fn legend_layout(&self) -> Vec<(f64, f64)> {
        let mut layout = Vec::with_capacity(self.series.len());
        let (mut x, mut line) = (0.0, 0.0);
        for series in &self.series {
            let width = legend_width(series);
            if x > 0.0 && x + width > WIDTH - LEFT - RIGHT {
                x = 0.0;
                line += 1.0;
            }
            layout.push((x, line));
            x += width;
        }
        layout
    }

    fn write_legend(&self, out: &mut String, layout: &[(f64, f64)]) -> fmt::Result {
        out.push_str(r#"<g class="legend">"#);
        for (series, &(x, line)) in self.series.iter().zip(layout) {
            let (x, y) = (LEFT + x, 10.0 + line * LEGEND_LINE + LEGEND_LINE / 2.0);
            let empty = !has_data(series);
            write!(
                out,
                r#"<line x1="{x}" y1="{y}" x2="{x2}" y2="{y}" stroke="{color}" stroke-width="3"{dash}/><text x="{tx}" y="{y}" dominant-baseline="middle">{name}{note}</text>"#,
                x2 = x + 16.0,
                color = series.color,
                dash = dash_attr(series),
                tx = x + 21.0,
                name = Escape(&series.name),
                note = if empty { " (no data)" } else { "" },
            )?;
        }
        out.push_str("</g>");
        Ok(())
    }
}

fn legend_width(series: &Series) -> f64 {
    // No text metrics on the server: 6.6 units per character fits the 11-unit sans-serif font.
    let chars = series.name.chars().count() + if has_data(series) { 0 } else { 10 };
    21.0 + chars as f64 * 6.6 + 16.0
}

fn has_data(series: &Series) -> bool {
    series
        .points
        .iter()
        .any(|(x, y)| x.is_finite() && y.is_finite())
}

fn dash_attr(series: &Series) -> &'static str {
    if series.dashed {
        r#" stroke-dasharray="6 4""#
    } else {
        ""
    }
}

fn write_axes(
    out: &mut String,
    frame: &Frame,
    x_ticks: &Ticks,
    y_ticks: &Ticks,
    y_unit: &str,
) -> fmt::Result {
    let bottom = frame.top + PLOT_HEIGHT;
    let right = LEFT + frame.width;
    out.push_str(r#"<g class="axis y">"#);
    for (value, label) in y_ticks.values.iter().zip(tick_labels(y_ticks)) {
        let y = frame.py(*value);
        write!(
            out,
            r#"<line class="grid" x1="{LEFT}" y1="{y:.1}" x2="{right}" y2="{y:.1}"/><text x="{lx}" y="{y:.1}" text-anchor="end" dominant-baseline="middle">{label}</text>"#,
            lx = LEFT - 6.0,
        )?;
    }
    write!(
        out,
        r#"<text class="axis-title" transform="translate(12 {my}) rotate(-90)" text-anchor="middle">{unit}</text></g>"#,
        my = frame.top + PLOT_HEIGHT / 2.0,
        unit = Escape(y_unit),
    )?;
    out.push_str(r#"<g class="axis x">"#);
    // A step's worth of slack absorbs float error at the ends.
    let slack = x_ticks.step * 1e-9;
    for &value in &x_ticks.values {
        if value < frame.x.0 - slack || value > frame.x.1 + slack {
            continue;
        }
        let x = frame.px(value);
        write!(
            out,
            r#"<line class="tick" x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{tb}"/><text x="{x:.1}" y="{ly}" text-anchor="middle">{label}</text>"#,
            tb = bottom + 4.0,
            ly = bottom + 16.0,
            label = time_label(value, x_ticks.step),
        )?;
    }
    write!(
        out,
        r#"<text class="axis-title" x="{mx}" y="{ty}" text-anchor="middle">seconds since start</text></g>"#,
        mx = LEFT + frame.width / 2.0,
        ty = bottom + 34.0,
    )
}

fn write_series(out: &mut String, frame: &Frame, series: &Series) -> fmt::Result {
    // Non-finite values split the line into runs instead of poisoning the path or the scale.
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for &(x, y) in &series.points {
        match runs.last_mut() {
            Some(run) if x.is_finite() && y.is_finite() => run.push((frame.px(x), frame.py(y))),
            Some(run) if !run.is_empty() => runs.push(Vec::new()),
            _ => {}
        }
    }
    runs.retain(|run| !run.is_empty());
    if runs.is_empty() {
        return Ok(());
    }
    let name = Escape(&series.name);
    write!(
        out,
        r#"<path class="series" data-series="{name}" fill="none" stroke="{color}" stroke-width="2" stroke-linejoin="round"{dash} d=""#,
        color = series.color,
        dash = dash_attr(series),
    )?;
    for run in &runs {
        for (i, (x, y)) in run.iter().enumerate() {
            write!(out, "{}{x:.1} {y:.1}", if i == 0 { 'M' } else { 'L' })?;
        }
    }
    write!(out, r#""><title>{name}</title></path>"#)?;
    // A lone point draws nothing as a path; mark it so a one-interval run is still visible.
    for run in runs.iter().filter(|run| run.len() == 1) {
        let (x, y) = run[0];
        write!(
            out,
            r#"<circle class="point" data-series="{name}" cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#,
            color = series.color,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(points: Vec<(f64, f64)>) -> String {
        let chart = LineChart {
            key: "latency",
            title: "Latency",
            y_unit: "ms",
            series: vec![Series {
                name: "p95".into(),
                color: "#000",
                dashed: false,
                points,
            }],
        };
        let mut out = String::new();
        chart.render(&mut out).expect("writing to a String");
        out
    }

    fn path_points(svg: &str) -> usize {
        let d = svg
            .split(" d=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("");
        d.matches(['M', 'L']).count()
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let t = nice_ticks(0.0, 97.0, 5);
        assert_eq!(t.step, 20.0);
        assert_eq!(t.values, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let t = nice_ticks(0.0, 0.33, 5);
        assert!((t.step - 0.1).abs() < 1e-12);
        assert_eq!(tick_labels(&t), vec!["0", "0.1", "0.2", "0.3", "0.4"]);
        let t = nice_ticks(0.0, 48_000.0, 5);
        assert_eq!(
            tick_labels(&t),
            vec!["0", "10k", "20k", "30k", "40k", "50k"]
        );
        let t = nice_ticks(0.0, 1500.0, 3);
        assert_eq!(tick_labels(&t), vec!["0", "500", "1,000", "1,500"]);
    }

    #[test]
    fn ticks_survive_degenerate_ranges() {
        assert_eq!(nice_ticks(0.0, 0.0, 5).values.first(), Some(&0.0));
        assert!(nice_ticks(0.0, 0.0, 5).values.last() >= Some(&1.0));
        let one = nice_ticks(7.0, 7.0, 5);
        assert!(one.values[0] <= 7.0 && *one.values.last().expect("ticks") >= 7.0);
        for (lo, hi) in [
            (f64::NAN, 1.0),
            (0.0, f64::INFINITY),
            (5.0, 1.0),
            (-f64::MAX, f64::MAX),
        ] {
            let t = nice_ticks(lo, hi, 5);
            assert!(t.step.is_finite() && t.step > 0.0, "{lo}..{hi}");
            assert!(!t.values.is_empty() && t.values.len() <= 101, "{lo}..{hi}");
        }
        assert!(nice_ticks(0.0, 1e300, 0).values.len() <= 101);
    }

    #[test]
    fn time_ticks_use_clock_steps() {
        assert_eq!(time_ticks(0.0, 60.0, 8).step, 10.0);
        assert_eq!(time_ticks(0.0, 600.0, 8).step, 120.0);
        assert_eq!(time_ticks(0.0, 3600.0, 8).step, 600.0);
        assert_eq!(time_label(300.0, 60.0), "5m");
        assert_eq!(time_label(5400.0, 1800.0), "1h30m");
        assert_eq!(time_label(45.0, 15.0), "45s");
        assert_eq!(time_label(0.5, 0.5), "0.5s");
    }

    #[test]
    fn no_points_render_a_no_data_note() {
        let svg = chart(Vec::new());
        assert!(svg.starts_with(r#"<svg class="chart" data-chart="latency""#));
        assert!(svg.contains("no data"));
        assert!(!svg.contains(r#"class="series""#));
        assert!(svg.ends_with("</svg>"));
    }

    #[test]
    fn one_point_renders_a_marker() {
        let svg = chart(vec![(1.0, 12.0)]);
        assert_eq!(path_points(&svg), 1);
        assert!(svg.contains(r#"<circle class="point" data-series="p95""#));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn many_points_render_one_path() {
        let points: Vec<_> = (1..=60)
            .map(|t| (f64::from(t), f64::from(t % 7) * 3.5))
            .collect();
        let svg = chart(points);
        assert_eq!(svg.matches(r#"class="series""#).count(), 1);
        assert_eq!(path_points(&svg), 60);
        assert!(svg.contains(">1m</text>") || svg.contains(">60s</text>"));
        assert!(!svg.contains("circle"));
    }

    #[test]
    fn all_zero_and_non_finite_data_stay_drawable() {
        let svg = chart(vec![(1.0, 0.0), (2.0, 0.0), (3.0, 0.0)]);
        assert_eq!(path_points(&svg), 3);
        assert!(!svg.contains("NaN"));
        let svg = chart(vec![
            (1.0, 1.0),
            (2.0, f64::NAN),
            (3.0, f64::INFINITY),
            (4.0, 2.0),
            (5.0, 3.0),
        ]);
        let d = svg.split(" d=\"").nth(1).expect("a path");
        assert!(d.starts_with('M') && d.matches('M').count() == 2, "{d}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn series_names_are_escaped() {
        let chart = LineChart {
            key: "cpu",
            title: "CPU",
            y_unit: "cores",
            series: vec![Series {
                name: "<b>\"svc\"</b>".into(),
                color: "#000",
                dashed: true,
                points: vec![(1.0, 1.0), (2.0, 2.0)],
            }],
        };
        let mut out = String::new();
        chart.render(&mut out).expect("writing to a String");
        assert!(!out.contains("<b>"));
        assert!(out.contains(r#"data-series="&lt;b&gt;&quot;svc&quot;&lt;/b&gt;""#));
        assert!(out.contains("stroke-dasharray"));
    }
}
