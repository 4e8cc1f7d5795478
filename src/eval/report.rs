//! The run report: one self-contained HTML file (inline CSS and SVG, no scripts, no network) that
//! shows how training went and how the chosen checkpoint performs, readable in any browser and
//! safe to attach to an e-mail or a lab notebook.

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;

use super::metrics::{pr_curve, roc_curve};
use super::svg::{LineChart, Series, Style, PALETTE};
use super::{Intervals, LogEntry, Metrics};

/// Everything the report shows. `best_metric` is one of [`Metrics::NAMES`]; it picks the best
/// development evaluation, as checkpoint selection does.
pub struct ReportInput<'a> {
    pub title: &'a str,
    pub config_toml: &'a str,
    pub log: &'a [LogEntry],
    pub best_metric: &'a str,
    pub test: Option<TestResult<'a>>,
}

/// Test-set predictions of the selected checkpoint: `probs` is row-major `labels.len() x num_classes`.
pub struct TestResult<'a> {
    pub metrics: &'a Metrics,
    pub labels: &'a [usize],
    pub probs: &'a [f32],
    pub num_classes: usize,
    /// Bootstrap intervals of `metrics`, shown beside them.
    pub intervals: Option<&'a Intervals>,
}

/// Escapes the characters that are special in HTML text and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Writes the report to `path` atomically, so a crash never leaves a truncated page.
pub fn write_report(path: &Path, input: &ReportInput) -> Result<()> {
    crate::fsutil::write_atomic(path, render_report(input).as_bytes())
}

const STYLE: &str = r#"
:root { color-scheme: light; }
body { margin: 0; background: #f5f6f8; color: #1f2328;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 0 0 12px; }
.sub { color: #59636e; margin: 0 0 20px; }
.card { background: #fff; border: 1px solid #dfe2e6; border-radius: 10px; padding: 18px 22px; margin: 0 0 20px; }
.stats { display: flex; flex-wrap: wrap; gap: 12px; margin: 0 0 20px; }
.stat { background: #fff; border: 1px solid #dfe2e6; border-radius: 10px; padding: 12px 18px; min-width: 150px; }
.stat .k { color: #59636e; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.stat .v { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.stat .d { color: #59636e; font-size: 12px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 18px; }
svg.chart { width: 100%; height: auto; display: block; font-family: inherit; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 12px; text-align: right; border-bottom: 1px solid #eceef1; }
th { font-weight: 600; color: #3d444d; background: #f8f9fa; }
th:first-child, td:first-child { text-align: left; }
th.key { color: #0b5cad; }
td.key { font-weight: 600; }
.scroll { overflow-x: auto; }
table.confusion td { min-width: 64px; text-align: center; border: 1px solid #fff; }
table.confusion th { text-align: center; }
table.confusion .pct { display: block; font-size: 11px; opacity: .8; }
pre { background: #f6f8fa; border: 1px solid #eceef1; border-radius: 6px; padding: 12px 14px;
  overflow: auto; font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; margin: 0; }
.note { color: #59636e; font-style: italic; }
"#;

/// Renders the report as a complete HTML document.
pub fn render_report(input: &ReportInput) -> String {
    let run = Run::from_log(input.log, input.best_metric);
    let mut html = page_start(input.title, "dnatune training report");
    html.push_str(&summary(input, &run));
    html.push_str(&training_section(&run));
    html.push_str(&dev_section(input.best_metric, &run));
    html.push_str(&metrics_section(input, &run));
    html.push_str(&test_section(input, &run));
    html.push_str(&page_end(input.config_toml));
    html
}

/// What the cross-validation report shows: each fold's test metrics, and the test predictions
/// of all folds pooled (every sequence once, scored by the model that held it out).
pub struct CrossValidationInput<'a> {
    pub title: &'a str,
    pub config_toml: &'a str,
    /// The metric that picked each fold's checkpoint; highlighted.
    pub metric: &'a str,
    pub folds: &'a [Metrics],
    pub pooled: TestResult<'a>,
}

/// Writes the cross-validation report to `path` atomically.
pub fn write_cross_validation_report(path: &Path, input: &CrossValidationInput) -> Result<()> {
    crate::fsutil::write_atomic(path, render_cross_validation_report(input).as_bytes())
}

/// The cross-validation report as a complete HTML document: the pooled and per-fold figures,
/// a table of every fold, pooled ROC and precision-recall curves and the pooled confusion matrix.
pub fn render_cross_validation_report(input: &CrossValidationInput) -> String {
    let k = input.folds.len();
    let mut html = page_start(input.title, "dnatune cross-validation report");
    html.push_str("<div class=\"stats\">");
    let pooled = input.pooled.metrics;
    html.push_str(&stat(
        &format!("pooled {}", input.metric),
        &fmt_metric(pooled.get(input.metric)),
        &format!("{} sequences, {k} folds", pooled.n),
    ));
    let values: Vec<f64> = input
        .folds
        .iter()
        .filter_map(|m| m.get(input.metric))
        .collect();
    if values.len() == k && k > 0 {
        let (mean, sd) = crate::train::mean_sd(&values);
        html.push_str(&stat(
            &format!("fold {}", input.metric),
            &format!("{mean:.4}"),
            &format!("mean, sd {sd:.4} over folds"),
        ));
    }
    if input.metric != "auroc" {
        html.push_str(&stat(
            "pooled auroc",
            &fmt_metric(pooled.auroc),
            "area under ROC",
        ));
    }
    html.push_str("</div>\n<section class=\"card\"><h2>Test metrics per fold</h2>");
    html.push_str(&metrics_table_start(input.metric));
    for (i, m) in input.folds.iter().enumerate() {
        html.push_str(&metrics_row(&format!("fold {}", i + 1), m, input.metric));
    }
    html.push_str(&metrics_row("pooled", pooled, input.metric));
    if let Some(intervals) = input.pooled.intervals {
        html.push_str(&interval_row("pooled", intervals, input.metric));
    }
    html.push_str("</tbody></table></div></section>\n");
    html.push_str(&predictions_card(
        "All folds' test predictions, pooled",
        &input.pooled,
    ));
    html.push_str(&page_end(input.config_toml));
    html
}

/// The document head and title of a report.
fn page_start(title: &str, subtitle: &str) -> String {
    let title = escape_html(title);
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n\
         <h1>{title}</h1>\n<p class=\"sub\">{subtitle}</p>\n"
    )
}

/// The configuration card and the end of the document.
fn page_end(config_toml: &str) -> String {
    format!(
        "<section class=\"card\"><h2>Configuration</h2><pre>{}</pre></section>\n</main>\n</body>\n</html>\n",
        escape_html(config_toml.trim_end())
    )
}

/// One evaluation from the log.
struct Eval<'a> {
    step: usize,
    metrics: &'a Metrics,
}

/// The log, sorted into what the report plots.
struct Run<'a> {
    /// `(step, loss)`, `(step, lr)` and throughput of the training entries.
    loss: Vec<(f64, f64)>,
    lr: Vec<(f64, f64)>,
    seq_per_s: Vec<f64>,
    last_step: Option<usize>,
    last_epoch: Option<f64>,
    /// The development split: the first evaluated split that is not "test".
    dev_split: Option<&'a str>,
    dev: Vec<Eval<'a>>,
    /// Index into `dev` of the best evaluation, and whether `best_metric` was available to pick it
    /// (otherwise the last evaluation stands in).
    best: Option<(usize, bool)>,
}

impl<'a> Run<'a> {
    fn from_log(log: &'a [LogEntry], best_metric: &str) -> Run<'a> {
        let (mut loss, mut lr, mut seq_per_s) = (Vec::new(), Vec::new(), Vec::new());
        let dev_split = log.iter().find_map(|e| match e {
            LogEntry::Eval { split, .. } if split != "test" => Some(split.as_str()),
            _ => None,
        });
        let mut dev = Vec::new();
        let mut last_epoch: Option<f64> = None;
        for entry in log {
            match entry {
                LogEntry::Train {
                    step,
                    epoch,
                    loss: l,
                    lr: r,
                    seq_per_s: s,
                } => {
                    loss.push((*step as f64, *l));
                    lr.push((*step as f64, *r));
                    seq_per_s.push(*s);
                    last_epoch = Some(last_epoch.map_or(*epoch, |e| e.max(*epoch)));
                }
                LogEntry::Eval {
                    step,
                    epoch,
                    split,
                    metrics,
                } => {
                    last_epoch = Some(last_epoch.map_or(*epoch, |e| e.max(*epoch)));
                    if Some(split.as_str()) == dev_split {
                        dev.push(Eval {
                            step: *step,
                            metrics,
                        });
                    }
                }
            }
        }
        let mut best: Option<(usize, f64)> = None;
        for (i, e) in dev.iter().enumerate() {
            if let Some(v) = e.metrics.get(best_metric).filter(|v| v.is_finite()) {
                if best.is_none_or(|(_, b)| Metrics::improves(best_metric, v, b)) {
                    best = Some((i, v));
                }
            }
        }
        let best = match best {
            Some((i, _)) => Some((i, true)),
            None => dev.len().checked_sub(1).map(|i| (i, false)),
        };
        Run {
            loss,
            lr,
            seq_per_s,
            last_step: log.iter().map(LogEntry::step).max(),
            last_epoch,
            dev_split,
            dev,
            best,
        }
    }

    fn best_eval(&self) -> Option<&Eval<'a>> {
        self.best.map(|(i, _)| &self.dev[i])
    }
}

fn fmt_metric(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        Some(v) => v.to_string(),
        None => "&mdash;".into(),
    }
}

fn stat(key: &str, value: &str, detail: &str) -> String {
    format!(
        "<div class=\"stat\"><div class=\"k\">{}</div><div class=\"v\">{value}</div><div class=\"d\">{detail}</div></div>",
        escape_html(key)
    )
}

fn summary(input: &ReportInput, run: &Run) -> String {
    let mut s = String::from("<div class=\"stats\">");
    if let Some(step) = run.last_step {
        let epochs = run
            .last_epoch
            .map(|e| format!("{e:.2} epochs"))
            .unwrap_or_default();
        s.push_str(&stat("steps", &step.to_string(), &epochs));
    }
    if let Some(best) = run.best_eval() {
        s.push_str(&stat(
            &format!("best dev {}", input.best_metric),
            &fmt_metric(best.metrics.get(input.best_metric)),
            &format!("at step {}", best.step),
        ));
    }
    if let Some(test) = &input.test {
        let interval = test
            .intervals
            .and_then(|i| i.get(input.best_metric))
            .map_or(String::new(), |[low, high]| {
                format!(", 95 % CI {low:.3}&ndash;{high:.3}")
            });
        s.push_str(&stat(
            &format!("test {}", input.best_metric),
            &fmt_metric(test.metrics.get(input.best_metric)),
            &format!("{} sequences{interval}", test.metrics.n),
        ));
        if input.best_metric != "auroc" {
            s.push_str(&stat(
                "test auroc",
                &fmt_metric(test.metrics.auroc),
                "area under ROC",
            ));
        }
    }
    if !run.seq_per_s.is_empty() {
        let mut speeds: Vec<f64> = run
            .seq_per_s
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .collect();
        speeds.sort_by(f64::total_cmp);
        if let Some(median) = speeds.get(speeds.len() / 2) {
            s.push_str(&stat(
                "throughput",
                &format!("{median:.1}"),
                "sequences/s (median)",
            ));
        }
    }
    s.push_str("</div>\n");
    s
}

/// Centred moving average over about 1/40 of the points, ignoring non-finite values, to show the
/// trend of a noisy per-step loss without the lag of a trailing average.
fn smooth(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let half = (points.len() / 40).max(1);
    (0..points.len())
        .map(|i| {
            let window = &points[i.saturating_sub(half)..(i + half + 1).min(points.len())];
            let finite: Vec<f64> = window
                .iter()
                .map(|p| p.1)
                .filter(|v| v.is_finite())
                .collect();
            let mean = if finite.is_empty() {
                f64::NAN
            } else {
                finite.iter().sum::<f64>() / finite.len() as f64
            };
            (points[i].0, mean)
        })
        .collect()
}

/// Fewer raw points than this are drawn plainly instead of faint-plus-smoothed.
const SMOOTH_FROM: usize = 10;

fn chart_cell(chart: &LineChart) -> String {
    format!("<div>{}</div>", chart.render())
}

fn training_section(run: &Run) -> String {
    let mut s = String::from("<section class=\"card\"><h2>Training</h2>");
    if run.loss.is_empty() {
        s.push_str("<p class=\"note\">No training steps were logged.</p></section>\n");
        return s;
    }
    let mut series = Vec::new();
    if run.loss.len() >= SMOOTH_FROM {
        series.push(Series {
            name: "train loss".into(),
            points: run.loss.clone(),
            color: PALETTE[0],
            style: Style::Faint,
        });
        series.push(Series {
            name: "train loss (smoothed)".into(),
            points: smooth(&run.loss),
            color: PALETTE[0],
            style: Style::Line,
        });
    } else {
        series.push(Series {
            name: "train loss".into(),
            points: run.loss.clone(),
            color: PALETTE[0],
            style: Style::Line,
        });
    }
    let dev_loss: Vec<(f64, f64)> = run
        .dev
        .iter()
        .filter_map(|e| e.metrics.loss.map(|l| (e.step as f64, l)))
        .collect();
    if !dev_loss.is_empty() {
        series.push(Series {
            name: format!("{} loss", run.dev_split.unwrap_or("dev")),
            points: dev_loss,
            color: PALETTE[1],
            style: Style::Line,
        });
    }
    let loss = LineChart {
        title: "Loss".into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        series,
        x_range: None,
        y_range: None,
        markers: Vec::new(),
        show_legend: true,
    };
    let lr = LineChart {
        title: "Learning rate".into(),
        x_label: "step".into(),
        y_label: "learning rate".into(),
        series: vec![Series {
            name: "learning rate".into(),
            points: run.lr.clone(),
            color: PALETTE[2],
            style: Style::Line,
        }],
        x_range: None,
        y_range: None,
        markers: Vec::new(),
        show_legend: false,
    };
    let _ = writeln!(
        s,
        "<div class=\"grid\">{}{}</div></section>",
        chart_cell(&loss),
        chart_cell(&lr)
    );
    s
}

fn dev_section(best_metric: &str, run: &Run) -> String {
    let split = escape_html(run.dev_split.unwrap_or("dev"));
    let mut s = format!("<section class=\"card\"><h2>Evaluation on {split}</h2>");
    if run.dev.is_empty() {
        s.push_str("<p class=\"note\">No evaluations were logged.</p></section>\n");
        return s;
    }
    let shown = [
        ("mcc", "MCC"),
        ("f1", "F1"),
        ("accuracy", "accuracy"),
        ("auroc", "AUROC"),
    ];
    let series: Vec<Series> = shown
        .iter()
        .zip(PALETTE)
        .filter_map(|(&(name, label), &color)| {
            let points: Vec<(f64, f64)> = run
                .dev
                .iter()
                .filter_map(|e| e.metrics.get(name).map(|v| (e.step as f64, v)))
                .collect();
            (!points.is_empty()).then(|| Series {
                name: label.into(),
                points,
                color,
                style: Style::Line,
            })
        })
        .collect();
    let markers = match (run.best_eval(), run.best) {
        (Some(best), Some((_, true))) => vec![(best.step as f64, format!("best {best_metric}"))],
        _ => Vec::new(),
    };
    let chart = LineChart {
        title: format!("Metrics on {}", run.dev_split.unwrap_or("dev")),
        x_label: "step".into(),
        y_label: "score".into(),
        series,
        x_range: None,
        y_range: None,
        markers,
        show_legend: true,
    };
    let _ = writeln!(
        s,
        "<div class=\"grid\">{}</div></section>",
        chart_cell(&chart)
    );
    s
}

fn metrics_row(label: &str, m: &Metrics, best_metric: &str) -> String {
    let mut row = format!("<tr><td>{label}</td><td>{}</td>", m.n);
    for name in TABLE_METRICS {
        let class = if *name == best_metric {
            " class=\"key\""
        } else {
            ""
        };
        let _ = write!(row, "<td{class}>{}</td>", fmt_metric(m.get(name)));
    }
    row.push_str("</tr>");
    row
}

/// The bootstrap interval of each metric in `row_label`'s row, under that row.
fn interval_row(row_label: &str, intervals: &Intervals, best_metric: &str) -> String {
    let mut row = format!(
        "<tr><td class=\"note\">{row_label}, {:.0} % CI ({} bootstrap resamples)</td><td></td>",
        100.0 * intervals.level,
        intervals.resamples
    );
    for name in TABLE_METRICS {
        let class = if *name == best_metric {
            " class=\"key note\""
        } else {
            " class=\"note\""
        };
        let cell = intervals.get(name).map_or("&mdash;".into(), |[low, high]| {
            format!("{low:.4}&ndash;{high:.4}")
        });
        let _ = write!(row, "<td{class}>{cell}</td>");
    }
    row.push_str("</tr>");
    row
}

const TABLE_METRICS: &[&str] = &[
    "accuracy",
    "precision",
    "recall",
    "f1",
    "mcc",
    "auroc",
    "auprc",
    "loss",
];

/// The opening of a metrics table up to its body, `key_metric` highlighted.
fn metrics_table_start(key_metric: &str) -> String {
    let mut s = String::from("<div class=\"scroll\"><table><thead><tr><th></th><th>n</th>");
    for name in TABLE_METRICS {
        let class = if *name == key_metric {
            " class=\"key\""
        } else {
            ""
        };
        let _ = write!(s, "<th{class}>{name}</th>");
    }
    s.push_str("</tr></thead><tbody>");
    s
}

fn metrics_section(input: &ReportInput, run: &Run) -> String {
    let best = run.best_eval();
    if best.is_none() && input.test.is_none() {
        return String::new();
    }
    let mut s = String::from("<section class=\"card\"><h2>Metrics</h2>");
    s.push_str(&metrics_table_start(input.best_metric));
    if let (Some(best), Some((_, found))) = (best, run.best) {
        let split = escape_html(run.dev_split.unwrap_or("dev"));
        let label = if found {
            format!("best {split} (step {})", best.step)
        } else {
            format!("last {split} (step {})", best.step)
        };
        s.push_str(&metrics_row(&label, best.metrics, input.best_metric));
    }
    if let Some(test) = &input.test {
        s.push_str(&metrics_row("test", test.metrics, input.best_metric));
        if let Some(intervals) = test.intervals {
            s.push_str(&interval_row("test", intervals, input.best_metric));
        }
    }
    s.push_str("</tbody></table></div>");
    if let Some((_, false)) = run.best {
        let _ = write!(
            s,
            "<p class=\"note\">No evaluation has a value for {}; the last one is shown.</p>",
            escape_html(input.best_metric)
        );
    }
    s.push_str("</section>\n");
    s
}

/// Confusion matrix with cells shaded by the fraction of their true class, so per-class recall
/// reads at a glance whatever the class sizes.
fn confusion_table(confusion: &[Vec<usize>]) -> String {
    let k = confusion.len();
    let mut s = String::from(
        "<div class=\"scroll\"><table class=\"confusion\"><thead><tr><th>true \\ predicted</th>",
    );
    for j in 0..k {
        let _ = write!(s, "<th>{j}</th>");
    }
    s.push_str("<th>total</th></tr></thead><tbody>");
    for (i, row) in confusion.iter().enumerate() {
        let total: usize = row.iter().sum();
        let _ = write!(s, "<tr><th>{i}</th>");
        for &count in row {
            let frac = if total == 0 {
                0.0
            } else {
                count as f64 / total as f64
            };
            let text = if frac > 0.55 { "#fff" } else { "#1f2328" };
            let _ = write!(
                s,
                "<td style=\"background: rgba(0, 114, 178, {:.3}); color: {text}\">{count}<span class=\"pct\">{:.1}%</span></td>",
                0.06 + 0.84 * frac,
                100.0 * frac
            );
        }
        let _ = write!(s, "<td>{total}</td></tr>");
    }
    s.push_str("</tbody></table></div>");
    s
}

/// At most this many one-vs-rest curves per chart; more would be an unreadable tangle.
const MAX_CURVES: usize = 8;

fn test_section(input: &ReportInput, run: &Run) -> String {
    let Some(test) = &input.test else {
        // Without a test set, the best development evaluation's confusion matrix still helps.
        return match run.best_eval() {
            Some(best) => format!(
                "<section class=\"card\"><h2>Confusion matrix ({} step {})</h2>{}</section>\n",
                escape_html(run.dev_split.unwrap_or("dev")),
                best.step,
                confusion_table(&best.metrics.confusion)
            ),
            None => String::new(),
        };
    };
    predictions_card("Test set", test)
}

/// Curves (or why there are none) and the confusion matrix of a set of predictions.
fn predictions_card(heading: &str, test: &TestResult) -> String {
    let mut s = format!("<section class=\"card\"><h2>{}</h2>", escape_html(heading));
    let c = test.num_classes;
    let consistent =
        c >= 2 && test.probs.len() == test.labels.len() * c && test.labels.iter().all(|&l| l < c);
    if !consistent {
        let _ = write!(
            s,
            "<p class=\"note\">No curves: {} labels do not fit {} probabilities for {c} classes.</p>",
            test.labels.len(),
            test.probs.len()
        );
    } else if c > MAX_CURVES {
        let _ = write!(
            s,
            "<p class=\"note\">No curves: {c} classes are too many to draw one-vs-rest curves.</p>"
        );
    } else {
        s.push_str(&curves(test));
    }
    s.push_str("<h2 style=\"margin-top:18px\">Confusion matrix</h2>");
    s.push_str(&confusion_table(&test.metrics.confusion));
    s.push_str("</section>\n");
    s
}

/// ROC and precision-recall charts: the positive class for a binary task, one-vs-rest per class
/// otherwise (classes lacking positives or negatives have no curve).
fn curves(test: &TestResult) -> String {
    let c = test.num_classes;
    let classes: Vec<usize> = if c == 2 { vec![1] } else { (0..c).collect() };
    let (mut roc, mut pr) = (Vec::new(), Vec::new());
    let mut prevalence = None;
    for (&k, &color) in classes.iter().zip(PALETTE) {
        let positive: Vec<bool> = test.labels.iter().map(|&l| l == k).collect();
        let scores: Vec<f32> = test.probs.chunks_exact(c).map(|row| row[k]).collect();
        let (Some(auroc), Some(ap)) = (
            super::metrics::auroc(&positive, &scores),
            super::metrics::average_precision(&positive, &scores),
        ) else {
            continue;
        };
        let (roc_name, pr_name) = if c == 2 {
            (
                format!("ROC (AUROC {auroc:.3})"),
                format!("PR (AP {ap:.3})"),
            )
        } else {
            (
                format!("class {k} (AUROC {auroc:.3})"),
                format!("class {k} (AP {ap:.3})"),
            )
        };
        roc.push(Series {
            name: roc_name,
            points: roc_curve(&positive, &scores),
            color,
            style: Style::Line,
        });
        pr.push(Series {
            name: pr_name,
            points: pr_curve(&positive, &scores),
            color,
            style: Style::Steps,
        });
        prevalence = Some(positive.iter().filter(|&&p| p).count() as f64 / positive.len() as f64);
    }
    if roc.is_empty() {
        return "<p class=\"note\">No curves: the test labels hold a single class.</p>".into();
    }
    roc.push(Series {
        name: "chance".into(),
        points: vec![(0.0, 0.0), (1.0, 1.0)],
        color: "#999999",
        style: Style::Dashed,
    });
    if let (2, Some(p)) = (c, prevalence) {
        pr.push(Series {
            name: format!("chance ({p:.3})"),
            points: vec![(0.0, p), (1.0, p)],
            color: "#999999",
            style: Style::Dashed,
        });
    }
    let roc = LineChart {
        title: "ROC curve".into(),
        x_label: "false positive rate".into(),
        y_label: "true positive rate".into(),
        series: roc,
        x_range: Some((0.0, 1.0)),
        y_range: Some((0.0, 1.0)),
        markers: Vec::new(),
        show_legend: true,
    };
    let pr = LineChart {
        title: "Precision-recall curve".into(),
        x_label: "recall".into(),
        y_label: "precision".into(),
        series: pr,
        x_range: Some((0.0, 1.0)),
        y_range: Some((0.0, 1.0)),
        markers: Vec::new(),
        show_legend: true,
    };
    format!(
        "<div class=\"grid\">{}{}</div>",
        chart_cell(&roc),
        chart_cell(&pr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::compute_metrics;

    /// A plausible binary run: noisy falling loss, warmup-then-decay schedule, rising dev scores.
    fn sample_log() -> Vec<LogEntry> {
        let mut log = Vec::new();
        let mut state = 12345u64;
        let mut noise = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as f64 / (1u64 << 31) as f64 - 0.5
        };
        for step in (10..=600).step_by(10) {
            let t = step as f64 / 600.0;
            log.push(LogEntry::Train {
                step,
                epoch: 3.0 * t,
                loss: 0.69 * (-2.0 * t).exp() + 0.15 + 0.08 * noise(),
                lr: if step <= 60 {
                    3e-5 * step as f64 / 60.0
                } else {
                    3e-5 * (600 - step) as f64 / 540.0
                },
                seq_per_s: 180.0 + 10.0 * noise(),
            });
            if step % 200 == 0 {
                let labels: Vec<usize> = (0..40).map(|i| i % 2).collect();
                let probs: Vec<f32> = (0..40)
                    .flat_map(|i| {
                        let p = if i % 2 == 1 {
                            0.5 + 0.3 * t
                        } else {
                            0.5 - 0.2 * t
                        } + 0.4 * noise();
                        let p = p.clamp(0.0, 1.0) as f32;
                        [1.0 - p, p]
                    })
                    .collect();
                let mut metrics = compute_metrics(&labels, &probs, 2);
                metrics.loss = Some(0.6 - 0.2 * t);
                log.push(LogEntry::Eval {
                    step,
                    epoch: 3.0 * t,
                    split: "dev".into(),
                    metrics,
                });
            }
        }
        log
    }

    fn sample_test(n: usize) -> (Vec<usize>, Vec<f32>) {
        let labels: Vec<usize> = (0..n).map(|i| (i * 7 % 5 < 2) as usize).collect();
        let probs = labels
            .iter()
            .enumerate()
            .flat_map(|(i, &l)| {
                let p = (0.35 + 0.3 * l as f32 + ((i * 37 % 11) as f32 / 11.0 - 0.5) * 0.6)
                    .clamp(0.0, 1.0);
                [1.0 - p, p]
            })
            .collect();
        (labels, probs)
    }

    #[test]
    fn report_has_one_svg_per_chart_and_escapes_config() {
        let log = sample_log();
        let (labels, probs) = sample_test(200);
        let metrics = compute_metrics(&labels, &probs, 2);
        let input = ReportInput {
            title: "GUE tf/0 <LoRA>",
            config_toml: "[train]\nnote = \"a < b & c\"\n",
            log: &log,
            best_metric: "mcc",
            test: Some(TestResult {
                metrics: &metrics,
                labels: &labels,
                probs: &probs,
                num_classes: 2,
                intervals: None,
            }),
        };
        let html = render_report(&input);
        // Loss, learning rate, dev metrics, ROC, PR.
        assert_eq!(html.matches("<svg").count(), 5);
        assert_eq!(html.matches("</svg>").count(), 5);
        assert!(html.contains("note = &quot;a &lt; b &amp; c&quot;"));
        assert!(!html.contains("a < b"));
        assert!(html.contains("GUE tf/0 &lt;LoRA&gt;") && !html.contains("<LoRA>"));
        let auroc_label = format!("AUROC {:.3}", metrics.auroc.unwrap());
        assert!(html.contains(&auroc_label), "legend lacks {auroc_label}");
        assert!(html.contains("chance"));
        assert!(html.contains("class=\"confusion\""));
        // The best dev row is the evaluation with the highest MCC.
        let best_step = log
            .iter()
            .filter_map(|e| match e {
                LogEntry::Eval { step, metrics, .. } => Some((*step, metrics.mcc)),
                _ => None,
            })
            .fold((0, f64::NEG_INFINITY), |b, c| if c.1 > b.1 { c } else { b })
            .0;
        assert!(html.contains(&format!("best dev (step {best_step})")));

        let path = std::env::temp_dir().join(format!("dnatune-report-{}.html", std::process::id()));
        write_report(&path, &input).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), html);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn report_without_log_or_test_still_renders() {
        let input = ReportInput {
            title: "empty",
            config_toml: "",
            log: &[],
            best_metric: "auroc",
            test: None,
        };
        let html = render_report(&input);
        assert_eq!(html.matches("<svg").count(), 0);
        assert!(html.contains("No training steps were logged"));
        assert!(html.ends_with("</html>\n"));
    }

    #[test]
    fn multiclass_test_draws_one_curve_per_class() {
        let labels = [0usize, 1, 2, 0, 1, 2, 0, 1, 2];
        let probs: Vec<f32> = labels
            .iter()
            .enumerate()
            .flat_map(|(i, &l)| {
                let mut row = [0.2f32, 0.2, 0.2];
                row[l] += 0.3;
                row[(l + i) % 3] += 0.3;
                row
            })
            .collect();
        let metrics = compute_metrics(&labels, &probs, 3);
        let html = render_report(&ReportInput {
            title: "three",
            config_toml: "",
            log: &[],
            best_metric: "mcc",
            test: Some(TestResult {
                metrics: &metrics,
                labels: &labels,
                probs: &probs,
                num_classes: 3,
                intervals: None,
            }),
        });
        assert_eq!(html.matches("<svg").count(), 2);
        for k in 0..3 {
            assert!(html.contains(&format!("class {k} (AUROC")), "class {k}");
        }
    }

    /// The bootstrap intervals appear under the test row, one cell per metric, and beside the
    /// test figure of the selection metric; a report without them has neither.
    #[test]
    fn report_shows_test_intervals() {
        let (labels, probs) = sample_test(200);
        let metrics = compute_metrics(&labels, &probs, 2);
        let intervals = crate::eval::test_intervals(&labels, &probs, 2).unwrap();
        let render = |intervals| {
            render_report(&ReportInput {
                title: "t",
                config_toml: "",
                log: &[],
                best_metric: "auroc",
                test: Some(TestResult {
                    metrics: &metrics,
                    labels: &labels,
                    probs: &probs,
                    num_classes: 2,
                    intervals,
                }),
            })
        };
        let html = render(Some(&intervals));
        let [low, high] = intervals.get("mcc").unwrap();
        assert!(html.contains(&format!("<td class=\"note\">{low:.4}&ndash;{high:.4}</td>")));
        let [low, high] = intervals.get("auroc").unwrap();
        assert!(html.contains(&format!(
            "<td class=\"key note\">{low:.4}&ndash;{high:.4}</td>"
        )));
        assert!(html.contains(&format!("200 sequences, 95 % CI {low:.3}&ndash;{high:.3}")));
        assert!(html.contains("test, 95 % CI (1000 bootstrap resamples)"));
        let without = render(None);
        assert!(!without.contains("% CI"));
    }

    #[test]
    fn smoothing_keeps_x_and_averages_neighbours() {
        let points: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, (i % 2) as f64)).collect();
        let s = smooth(&points);
        assert_eq!(s.len(), 5);
        assert_eq!(s[2], (2.0, (1.0 + 0.0 + 1.0) / 3.0));
        assert_eq!(s[0], (0.0, 0.5));
    }

    #[test]
    fn escaping() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    /// The cross-validation report: a row per fold and a pooled row, the pooled MCC and the
    /// fold mean recomputed by hand, pooled curves with their AUROC, an escaped title.
    #[test]
    fn cross_validation_report_shows_every_fold_and_the_pooled_predictions() {
        let fold = |shift: f32| {
            let labels: Vec<usize> = (0..30).map(|i| i % 2).collect();
            let probs: Vec<f32> = (0..30)
                .flat_map(|i| {
                    let p = (0.2 + 0.5 * (i % 2) as f32 + shift * ((i * 7 % 5) as f32 / 5.0))
                        .clamp(0.0, 1.0);
                    [1.0 - p, p]
                })
                .collect();
            (labels, probs)
        };
        let parts = [fold(0.1), fold(0.4), fold(0.7)];
        let folds: Vec<Metrics> = parts
            .iter()
            .map(|(l, p)| compute_metrics(l, p, 2))
            .collect();
        let labels: Vec<usize> = parts.iter().flat_map(|(l, _)| l.clone()).collect();
        let probs: Vec<f32> = parts.iter().flat_map(|(_, p)| p.clone()).collect();
        let pooled = compute_metrics(&labels, &probs, 2);
        let html = render_cross_validation_report(&CrossValidationInput {
            title: "peaks <chr> folds",
            config_toml: "seed = 42\n",
            metric: "mcc",
            folds: &folds,
            pooled: TestResult {
                metrics: &pooled,
                labels: &labels,
                probs: &probs,
                num_classes: 2,
                intervals: None,
            },
        });
        assert!(html.contains("<title>peaks &lt;chr&gt; folds</title>"));
        assert_eq!(html.matches("<tr><td>fold ").count(), 3);
        assert!(html.contains("<tr><td>pooled</td><td>90</td>"));
        let mean = folds.iter().map(|m| m.mcc).sum::<f64>() / 3.0;
        assert!(
            html.contains(&format!("<div class=\"v\">{mean:.4}</div>")),
            "fold mean"
        );
        assert!(html.contains(&format!("<div class=\"v\">{:.4}</div>", pooled.mcc)));
        assert!(
            (mean - pooled.mcc).abs() > 1e-3,
            "pooled and mean differ here"
        );
        let auroc = pooled.auroc.unwrap();
        assert!(
            html.contains(&format!("ROC (AUROC {auroc:.3})")),
            "pooled curve"
        );
        assert!(html.contains("seed = 42"));
    }
}
