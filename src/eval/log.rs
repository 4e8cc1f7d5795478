//! The training log: one JSON object per line, tagged by `kind`, so a run can be plotted (or a
//! report regenerated) after the fact and the file stays readable with `jq` or pandas.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Metrics;

/// One line of the training log.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogEntry {
    /// An optimiser step (or an average over the last few), with throughput in sequences/second.
    Train {
        step: usize,
        epoch: f64,
        loss: f64,
        lr: f64,
        seq_per_s: f64,
    },
    /// An evaluation of `split` ("dev", "test", ...) at `step`.
    Eval {
        step: usize,
        epoch: f64,
        split: String,
        metrics: Metrics,
    },
}

impl LogEntry {
    /// The step the entry was recorded at.
    pub fn step(&self) -> usize {
        match self {
            LogEntry::Train { step, .. } | LogEntry::Eval { step, .. } => *step,
        }
    }
}

/// Parses JSON-lines log text; `source` names it in errors (file name and 1-based line). Blank
/// lines are skipped so a trailing newline or hand edits do not break reading.
pub fn parse_log(text: &str, source: &str) -> Result<Vec<LogEntry>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{source}:{}: not a valid log entry", i + 1))
        })
        .collect()
}

/// Reads a JSON-lines training log from `path`.
pub fn read_log(path: &Path) -> Result<Vec<LogEntry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read log {}", path.display()))?;
    parse_log(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_metrics() -> Metrics {
        Metrics {
            n: 4,
            accuracy: 0.75,
            precision: 0.5,
            recall: 1.0,
            f1: 2.0 / 3.0,
            mcc: 0.5773502691896258,
            auroc: Some(0.875),
            auprc: None,
            confusion: vec![vec![2, 1], vec![0, 1]],
            loss: Some(0.4),
        }
    }

    #[test]
    fn json_round_trip_with_kind_tag() {
        let entries = [
            LogEntry::Train {
                step: 10,
                epoch: 0.5,
                loss: 0.69,
                lr: 2e-5,
                seq_per_s: 123.5,
            },
            LogEntry::Eval {
                step: 20,
                epoch: 1.0,
                split: "dev".into(),
                metrics: sample_metrics(),
            },
        ];
        let text: String = entries
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["kind"], "train");
        assert_eq!(first["lr"], 2e-5);
        let second: serde_json::Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(second["kind"], "eval");
        assert_eq!(second["metrics"]["auprc"], serde_json::Value::Null);

        let back = parse_log(&text, "log.jsonl").unwrap();
        assert_eq!(back.len(), 2);
        match (&back[0], &back[1]) {
            (LogEntry::Train { step, lr, .. }, LogEntry::Eval { split, metrics, .. }) => {
                assert_eq!((*step, *lr), (10, 2e-5));
                assert_eq!(split, "dev");
                assert_eq!(metrics, &sample_metrics());
            }
            other => panic!("wrong variants: {other:?}"),
        }
        assert_eq!(back[1].step(), 20);
    }

    #[test]
    fn loss_is_optional_in_json() {
        let mut m = sample_metrics();
        m.loss = None;
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("loss"));
        assert_eq!(serde_json::from_str::<Metrics>(&json).unwrap(), m);
    }

    #[test]
    fn bad_line_names_source_and_line() {
        let text = "{\"kind\":\"train\",\"step\":1,\"epoch\":0.1,\"loss\":1.0,\"lr\":0.1,\"seq_per_s\":5}\n\n{\"kind\":\"nap\"}\n";
        let err = parse_log(text, "run/log.jsonl").unwrap_err();
        assert!(err.to_string().contains("run/log.jsonl:3"), "{err}");
    }
}
