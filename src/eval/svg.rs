//! A small SVG line-chart renderer (axes, "nice" ticks, grid, legend) so reports need no plotting
//! library and stay a single self-contained HTML file.

use std::fmt::Write;

use super::report::escape_html;

/// Colours that stay distinguishable for common colour-vision deficiencies (Okabe-Ito order).
pub const PALETTE: &[&str] = &[
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Style {
    /// Solid line; points are marked when there are few of them.
    Line,
    /// Thin translucent line, for noisy raw values under a smoothed one.
    Faint,
    /// Dashed line, for references such as the chance diagonal.
    Dashed,
    /// Step line that jumps vertically before moving right, as a precision-recall curve is read.
    Steps,
}

/// One named line of `(x, y)` points; non-finite points break the line.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: &'static str,
    pub style: Style,
}

/// A line chart; `x_range`/`y_range` fix an axis (e.g. `[0, 1]` for rates), otherwise it spans
/// the data, widened to round tick values.
#[derive(Clone, Debug)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    /// Labelled vertical marker lines, e.g. the step of the best evaluation.
    pub markers: Vec<(f64, String)>,
    /// Draw the legend (in whichever corner of the plot the data crosses least); off for a single
    /// series that the title already names.
    pub show_legend: bool,
}

const WIDTH: f64 = 540.0;
const HEIGHT: f64 = 350.0;
const LEFT: f64 = 68.0;
const RIGHT: f64 = 18.0;
const TOP: f64 = 38.0;
const BOTTOM: f64 = 50.0;
/// Series with at most this many points also get a dot per point, so sparse data stays visible.
const MARK_POINTS_UP_TO: usize = 40;

/// An axis: the value span mapped onto the plot and where its ticks go.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    step: f64,
}

impl Axis {
    fn new(fixed: Option<(f64, f64)>, values: impl Iterator<Item = f64>) -> Axis {
        if let Some((lo, hi)) = fixed {
            let step = nice_step((hi - lo) / 5.0);
            let first = (lo / step).ceil() as i64;
            let last = (hi / step + 1e-9).floor() as i64;
            let ticks = (first..=last).map(|i| i as f64 * step).collect();
            return Axis {
                lo,
                hi,
                ticks,
                step,
            };
        }
        let (mut lo, mut hi) = values
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if lo > hi {
            (lo, hi) = (0.0, 1.0);
        } else if lo == hi {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo, hi) = (lo - pad, hi + pad);
        }
        let step = nice_step((hi - lo) / 5.0);
        let first = (lo / step + 1e-9).floor() as i64;
        let last = (hi / step - 1e-9).ceil() as i64;
        let ticks = (first..=last).map(|i| i as f64 * step).collect();
        Axis {
            lo: first as f64 * step,
            hi: last as f64 * step,
            ticks,
            step,
        }
    }

    fn fraction(&self, v: f64) -> f64 {
        (v - self.lo) / (self.hi - self.lo)
    }

    /// Tick label with just enough decimals for the tick spacing; scientific for tiny or huge
    /// values (learning rates), where fixed decimals would be unreadable.
    fn label(&self, v: f64) -> String {
        let magnitude = self.lo.abs().max(self.hi.abs());
        if v == 0.0 {
            "0".into()
        } else if !(1e-3..1e6).contains(&magnitude) {
            format!("{v:.1e}")
        } else {
            // Fewest decimals that still show the step exactly (0.25 needs two, 0.2 one).
            let decimals = (0..=12)
                .find(|&d| {
                    let scaled = self.step * 10f64.powi(d);
                    (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
                })
                .unwrap_or(12) as usize;
            format!("{v:.decimals$}")
        }
    }
}

/// The 1, 2, 2.5 or 5 times a power of ten closest above `raw`.
fn nice_step(raw: f64) -> f64 {
    if !raw.is_finite() || raw <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(raw.log10().floor());
    let mantissa = raw / power;
    let nice = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .find(|&m| mantissa <= m + 1e-9)
        .unwrap_or(10.0);
    nice * power
}

impl LineChart {
    /// The chart as an `<svg>` element that scales to its container's width.
    pub fn render(&self) -> String {
        let points = || self.series.iter().flat_map(|s| s.points.iter());
        let xa = Axis::new(self.x_range, points().map(|p| p.0));
        let ya = Axis::new(self.y_range, points().map(|p| p.1));
        let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        let px = |x: f64| LEFT + xa.fraction(x) * pw;
        let py = |y: f64| TOP + (1.0 - ya.fraction(y)) * ph;

        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{title}" font-size="13">"#,
            title = escape_html(&self.title)
        );
        let _ = write!(
            s,
            r##"<text x="{LEFT}" y="22" font-size="14" font-weight="600" fill="#222">{}</text>"##,
            escape_html(&self.title)
        );
        // Grid and tick labels.
        for &t in &ya.ticks {
            let y = py(t);
            let _ = write!(
                s,
                r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e6e6e6"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                ya.label(t)
            );
        }
        for &t in &xa.ticks {
            let x = px(t);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{:.1}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
                TOP + ph,
                TOP + ph + 16.0,
                xa.label(t)
            );
        }
        // Axes frame and labels.
        let _ = write!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
        );
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
            LEFT + pw / 2.0,
            HEIGHT - 10.0,
            escape_html(&self.x_label)
        );
        let _ = write!(
            s,
            r##"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle" fill="#333">{}</text>"##,
            TOP + ph / 2.0,
            escape_html(&self.y_label)
        );
        for (x, label) in &self.markers {
            if !x.is_finite() || xa.fraction(*x) < 0.0 || xa.fraction(*x) > 1.0 {
                continue;
            }
            // Label on the side with more room, so a marker at the right edge stays readable.
            let right_half = xa.fraction(*x) > 0.5;
            let x = px(*x);
            let (label_x, anchor) = if right_half {
                (x - 4.0, "end")
            } else {
                (x + 4.0, "start")
            };
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{:.1}" stroke="#888" stroke-dasharray="2 3"/><text x="{label_x:.1}" y="{:.1}" text-anchor="{anchor}" fill="#666" font-size="11">{}</text>"##,
                TOP + ph,
                TOP + 13.0,
                escape_html(label)
            );
        }
        for series in &self.series {
            s.push_str(&series_path(series, &px, &py));
        }
        let drawn: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|series| sample_segments(&series.points))
            .map(|(x, y)| (px(x), py(y)))
            .collect();
        s.push_str(&self.legend_box(pw, ph, &drawn));
        s.push_str("</svg>");
        s
    }

    /// The legend in the plot corner that covers the fewest of the `drawn` pixel positions.
    fn legend_box(&self, pw: f64, ph: f64, drawn: &[(f64, f64)]) -> String {
        if self.series.is_empty() || !self.show_legend {
            return String::new();
        }
        let longest = self
            .series
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(0);
        let (row, pad, inset) = (18.0, 8.0, 10.0);
        let w = 34.0 + longest as f64 * 7.2 + pad;
        let h = self.series.len() as f64 * row + pad;
        let (left, right) = (LEFT + inset, LEFT + pw - w - inset);
        let (top, bottom) = (TOP + inset, TOP + ph - h - inset);
        // Preference order on ties: the conventional spots first.
        let corners = [(right, top), (right, bottom), (left, bottom), (left, top)];
        let covered = |&(cx, cy): &(f64, f64)| {
            drawn
                .iter()
                .filter(|&&(x, y)| {
                    x >= cx - 4.0 && x <= cx + w + 4.0 && y >= cy - 4.0 && y <= cy + h + 4.0
                })
                .count()
        };
        let (x, y) = corners
            .iter()
            .copied()
            .min_by_key(|c| covered(c))
            .unwrap_or(corners[0]);
        let mut s = format!(
            r##"<g class="legend"><rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" rx="4" fill="#fff" fill-opacity="0.9" stroke="#ccc"/>"##
        );
        for (i, series) in self.series.iter().enumerate() {
            let cy = y + pad / 2.0 + row * (i as f64 + 0.5);
            let _ = write!(
                s,
                r##"<line x1="{:.1}" x2="{:.1}" y1="{cy:.1}" y2="{cy:.1}" stroke="{}" {}/><text x="{:.1}" y="{:.1}" fill="#222">{}</text>"##,
                x + 8.0,
                x + 28.0,
                series.color,
                stroke_attrs(series.style),
                x + 34.0,
                cy + 4.0,
                escape_html(&series.name)
            );
        }
        s.push_str("</g>");
        s
    }
}

fn stroke_attrs(style: Style) -> &'static str {
    match style {
        Style::Line | Style::Steps => r#"stroke-width="2""#,
        Style::Faint => r#"stroke-width="1.2" stroke-opacity="0.35""#,
        Style::Dashed => r#"stroke-width="1.5" stroke-dasharray="5 4""#,
    }
}

/// Points along each finite segment of `points`, so a long straight segment still counts as
/// occupying the space it crosses.
fn sample_segments(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    const SAMPLES: usize = 16;
    let finite = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let mut out: Vec<(f64, f64)> = points.iter().copied().filter(finite).collect();
    for w in points.windows(2).filter(|w| finite(&w[0]) && finite(&w[1])) {
        for i in 1..SAMPLES {
            let t = i as f64 / SAMPLES as f64;
            out.push((
                w[0].0 + t * (w[1].0 - w[0].0),
                w[0].1 + t * (w[1].1 - w[0].1),
            ));
        }
    }
    out
}

/// The series as a path (split at non-finite points) plus dots when it is sparse.
fn series_path(series: &Series, px: &dyn Fn(f64) -> f64, py: &dyn Fn(f64) -> f64) -> String {
    let mut d = String::new();
    let mut previous: Option<(f64, f64)> = None;
    for &(x, y) in &series.points {
        if !(x.is_finite() && y.is_finite()) {
            previous = None;
            continue;
        }
        let (sx, sy) = (px(x), py(y));
        match previous {
            None => {
                let _ = write!(d, "M{sx:.1} {sy:.1}");
            }
            Some((prev_x, _)) if series.style == Style::Steps => {
                let _ = write!(d, "L{prev_x:.1} {sy:.1}L{sx:.1} {sy:.1}");
            }
            Some(_) => {
                let _ = write!(d, "L{sx:.1} {sy:.1}");
            }
        }
        previous = Some((sx, sy));
    }
    let mut s = format!(
        r#"<path d="{d}" fill="none" stroke="{}" stroke-linejoin="round" {}/>"#,
        series.color,
        stroke_attrs(series.style)
    );
    let finite = series
        .points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    if series.style == Style::Line && finite.clone().count() <= MARK_POINTS_UP_TO {
        for &(x, y) in finite {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                px(x),
                py(y),
                series.color
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.17), 0.2);
        assert_eq!(nice_step(23.0), 25.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert!((nice_step(4e-6) - 5e-6).abs() < 1e-18);
    }

    #[test]
    fn axis_covers_data_with_round_ticks() {
        let a = Axis::new(None, [0.13, 0.87].into_iter());
        assert!(a.lo <= 0.13 && a.hi >= 0.87);
        assert_eq!(a.ticks.first().copied(), Some(a.lo));
        assert!(a.ticks.len() >= 4 && a.ticks.len() <= 8, "{:?}", a.ticks);
        assert_eq!(a.label(0.4), "0.4");
        let quarters = Axis::new(Some((0.0, 1.25)), std::iter::empty());
        assert_eq!(quarters.label(0.25), "0.25");
        // Learning rates get scientific labels.
        let lr = Axis::new(None, [0.0, 2e-5].into_iter());
        assert_eq!(lr.label(1e-5), "1.0e-5");
        // A constant series still gets a non-empty span.
        let flat = Axis::new(None, [3.0, 3.0].into_iter());
        assert!(flat.lo < 3.0 && flat.hi > 3.0);
    }

    #[test]
    fn nan_breaks_the_line_and_steps_add_corners() {
        let id = |v: f64| v;
        let mut series = Series {
            name: "s".into(),
            points: vec![(0.0, 0.0), (1.0, f64::NAN), (2.0, 1.0), (3.0, 2.0)],
            color: PALETTE[0],
            style: Style::Line,
        };
        let path = series_path(&series, &id, &id);
        assert!(path.contains(r#"d="M0.0 0.0M2.0 1.0L3.0 2.0""#), "{path}");
        assert_eq!(path.matches("<circle").count(), 3);
        series.style = Style::Steps;
        let path = series_path(&series, &id, &id);
        assert!(path.contains("L2.0 2.0L3.0 2.0"), "{path}");
    }

    #[test]
    fn chart_escapes_names() {
        let chart = LineChart {
            title: "a<b".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series {
                name: "dev & test".into(),
                points: vec![(0.0, 1.0), (1.0, 2.0)],
                color: PALETTE[1],
                style: Style::Line,
            }],
            x_range: None,
            y_range: None,
            markers: vec![(0.5, "best".into())],
            show_legend: true,
        };
        let svg = chart.render();
        assert!(svg.contains("a&lt;b") && svg.contains("dev &amp; test"));
        assert!(!svg.contains("a<b"));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
    }
}
