//! Evaluation: classification metrics, the training log, and the HTML run report.
//!
//! `metrics` turns labels and softmax outputs into [`Metrics`], `bootstrap` into their
//! confidence intervals, `compare` into the paired difference of two models; `log` is the JSON-lines record the trainer appends to; `report` renders
//! both into a self-contained page with SVG charts drawn by `svg`.

mod bootstrap;
mod compare;
mod log;
mod metrics;
mod report;
pub mod svg;

pub use bootstrap::{bootstrap_intervals, test_intervals, Intervals};
pub use compare::{
    paired_bootstrap, predictions_file, read_labelled_predictions, LabelledPredictions,
    MetricDifference,
};
pub use log::{parse_log, read_log, LogEntry};
pub use metrics::{
    argmax, auroc, average_precision, compute_metrics, confusion_matrix, mcc, pr_curve, roc_curve,
    try_compute_metrics, Metrics,
};
pub use report::{
    escape_html, render_cross_validation_report, render_report, write_cross_validation_report,
    write_report, CrossValidationInput, ReportInput, TestResult,
};
