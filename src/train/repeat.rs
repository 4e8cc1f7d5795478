//! One configuration run several times: once per seed, to see how stable a result is, or once
//! per fold of a k-fold cross-validation, so that every sequence is tested by a model that did
//! not train on it. Both reuse finished runs and resume interrupted ones.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::config::{SplitSettings, TrainConfig};
use super::{run, state};

use crate::eval::{self, read_labelled_predictions, Metrics};

/// Mean and sample standard deviation of a test metric over repeated runs.
#[derive(Debug, serde::Serialize)]
pub struct MetricSpread {
    pub metric: String,
    pub mean: f64,
    pub sd: f64,
    pub values: Vec<f64>,
}

/// Runs the same configuration once per seed (each in `out/seed-N`) and summarises the test
/// metrics as mean +- sd in `out/seeds_summary.json`, since single-seed GUE numbers are known to
/// be unstable.
pub fn run_seeds(cfg: &TrainConfig, seeds: &[u64]) -> Result<Vec<MetricSpread>> {
    if seeds.is_empty() {
        bail!("--seeds needs at least one seed");
    }
    let runs: Vec<(String, TrainConfig)> = seeds
        .iter()
        .map(|&seed| {
            let run_cfg = TrainConfig {
                seed,
                out: cfg.out.join(format!("seed-{seed}")),
                ..cfg.clone()
            };
            (format!("seed {seed}"), run_cfg)
        })
        .collect();
    let tests = run_each(&runs)?;
    let stats = spread(&tests);
    print_spread(&format!("seeds {seeds:?}"), &stats);
    crate::fsutil::write_json_atomic(
        &cfg.out.join("seeds_summary.json"),
        &serde_json::json!({ "seeds": seeds, "test": stats }),
    )?;
    Ok(stats)
}

/// What a cross-validation measured.
pub struct FoldsSummary {
    /// Each fold's test metrics, as mean +- sd over the folds.
    pub per_fold: Vec<MetricSpread>,
    /// The metrics of all folds' test predictions pooled: every sequence once.
    pub pooled: Metrics,
}

/// k-fold cross-validation of one input file (`cfg.split.folds` folds, each run in
/// `out/fold-K`): the folds' test sets partition the data by the split strategy (whole
/// chromosomes with `chromosome`), and each run keeps its best checkpoint on dev drawn from
/// the other folds. Writes `out/cv_predictions.csv` (every sequence's prediction by the model
/// that held it out) and `out/folds_summary.json`.
pub fn run_folds(cfg: &TrainConfig) -> Result<FoldsSummary> {
    let k = cfg.split.folds;
    if k < 2 {
        bail!("cross-validation needs at least 2 folds, got {k}");
    }
    if cfg.data.is_dir() {
        bail!(
            "cross-validation splits one file; {} is a directory of fixed train/dev/test \
             splits (GUE layout)",
            cfg.data.display()
        );
    }
    let runs: Vec<(String, TrainConfig)> = (1..=k)
        .map(|fold| {
            let run_cfg = TrainConfig {
                out: cfg.out.join(format!("fold-{fold}")),
                split: SplitSettings {
                    fold,
                    ..cfg.split.clone()
                },
                ..cfg.clone()
            };
            (format!("fold {fold} of {k}"), run_cfg)
        })
        .collect();
    let tests = run_each(&runs)?;
    let per_fold = spread(&tests);
    print_spread(&format!("{k} folds"), &per_fold);
    let dirs: Vec<PathBuf> = runs.iter().map(|(_, c)| c.out.clone()).collect();
    let predictions = pool_fold_predictions(&dirs, &cfg.out.join("cv_predictions.csv"))?;
    let pooled = eval::try_compute_metrics(
        &predictions.labels,
        &predictions.probs,
        predictions.num_classes,
    )?;
    let pooled_intervals = eval::test_intervals(
        &predictions.labels,
        &predictions.probs,
        predictions.num_classes,
    )?;
    let title = format!(
        "{}: {k}-fold cross-validation ({:?} folds)",
        cfg.data.file_name().unwrap_or_default().to_string_lossy(),
        cfg.split.strategy
    );
    eval::write_cross_validation_report(
        &cfg.out.join("cv_report.html"),
        &eval::CrossValidationInput {
            title: &title,
            config_toml: &cfg.to_toml()?,
            metric: &cfg.metric,
            folds: &tests,
            pooled: eval::TestResult {
                metrics: &pooled,
                labels: &predictions.labels,
                probs: &predictions.probs,
                num_classes: predictions.num_classes,
                intervals: Some(&pooled_intervals),
            },
        },
    )?;
    println!(
        "pooled over the {k} test folds ({} sequences, each scored by the model that held it \
         out): MCC {:.4} ({}), accuracy {:.4}, AUROC {}; predictions in {}, report in {}",
        pooled.n,
        pooled.mcc,
        pooled_intervals
            .get("mcc")
            .map_or("-".into(), |[low, high]| format!(
                "95 % CI {low:.4}-{high:.4}"
            )),
        pooled.accuracy,
        pooled.auroc.map_or("-".into(), |v| format!("{v:.4}")),
        cfg.out.join("cv_predictions.csv").display(),
        cfg.out.join("cv_report.html").display()
    );
    crate::fsutil::write_json_atomic(
        &cfg.out.join("folds_summary.json"),
        &serde_json::json!({
            "folds": k,
            "test": per_fold,
            "pooled": pooled,
            "pooled_intervals": pooled_intervals
        }),
    )?;
    Ok(FoldsSummary { per_fold, pooled })
}

/// Trains (or reuses, or resumes) each named configuration in turn; their test metrics.
fn run_each(runs: &[(String, TrainConfig)]) -> Result<Vec<Metrics>> {
    let mut tests = Vec::new();
    for (name, run_cfg) in runs {
        println!("\n=== {name} ===");
        let test = match previous_run(run_cfg)? {
            PreviousRun::Finished(test) => {
                println!(
                    "reusing the finished run in {} (test MCC {:.4})",
                    run_cfg.out.display(),
                    test.mcc
                );
                test
            }
            PreviousRun::Interrupted => run(run_cfg, true)?.test,
            PreviousRun::None => run(run_cfg, false)?.test,
        };
        tests.push(test);
    }
    Ok(tests)
}

/// Mean +- sd of the metrics every run has.
fn spread(tests: &[Metrics]) -> Vec<MetricSpread> {
    ["mcc", "accuracy", "f1", "auroc", "auprc"]
        .iter()
        .filter_map(|&name| {
            let values: Vec<f64> = tests.iter().filter_map(|m| m.get(name)).collect();
            (values.len() == tests.len()).then(|| {
                let (mean, sd) = mean_sd(&values);
                MetricSpread {
                    metric: name.to_string(),
                    mean,
                    sd,
                    values,
                }
            })
        })
        .collect()
}

fn print_spread(over: &str, stats: &[MetricSpread]) {
    println!("\ntest metrics over {over} (mean +- sd)");
    for s in stats {
        println!("{:<10} {:.4} +- {:.4}", s.metric, s.mean, s.sd);
    }
}

/// Labels and class probabilities (row-major) of pooled predictions.
struct PooledPredictions {
    labels: Vec<usize>,
    probs: Vec<f32>,
    num_classes: usize,
}

/// Concatenates the runs' `test_predictions.csv` into `out` with a leading `fold` column
/// (1-based, in `dirs` order); their labels and probabilities, as written.
fn pool_fold_predictions(dirs: &[PathBuf], out: &Path) -> Result<PooledPredictions> {
    let mut header: Option<csv::StringRecord> = None;
    let mut rows: Vec<(usize, csv::StringRecord)> = Vec::new();
    let mut pooled = PooledPredictions {
        labels: Vec::new(),
        probs: Vec::new(),
        num_classes: 0,
    };
    for (fold, dir) in dirs.iter().enumerate() {
        let path = dir.join("test_predictions.csv");
        let mut rdr = csv::Reader::from_path(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let this = rdr.headers()?.clone();
        match &header {
            Some(h) if *h != this => bail!(
                "{} has the columns {:?}, the first fold {:?}",
                path.display(),
                this,
                h
            ),
            _ => header = Some(this),
        }
        for row in rdr.records() {
            rows.push((fold + 1, row.with_context(|| path.display().to_string())?));
        }
        let scored = read_labelled_predictions(&path)?;
        pooled.labels.extend(scored.labels);
        pooled.probs.extend(scored.probs);
        pooled.num_classes = scored.num_classes;
    }
    let header = header.context("no folds to pool")?;
    crate::fsutil::write_atomic_with(out, |w| {
        let mut csv_out = csv::Writer::from_writer(w);
        csv_out.write_record(std::iter::once("fold").chain(header.iter()))?;
        for (fold, row) in &rows {
            let fold = fold.to_string();
            csv_out.write_record(std::iter::once(fold.as_str()).chain(row.iter()))?;
        }
        csv_out.flush()?;
        Ok(())
    })?;
    Ok(pooled)
}

/// What a run folder already holds.
enum PreviousRun {
    /// A finished run of this configuration: its test metrics.
    Finished(Metrics),
    /// A run of this configuration stopped after a checkpoint.
    Interrupted,
    /// Nothing to continue (no folder, or one without a run in it).
    None,
}

/// Looks in `cfg.out` for an earlier run of exactly `cfg`; a folder holding a run with another
/// configuration is an error rather than overwritten.
fn previous_run(cfg: &TrainConfig) -> Result<PreviousRun> {
    let config_path = cfg.out.join("config.toml");
    if !config_path.exists() {
        return Ok(PreviousRun::None);
    }
    let previous = TrainConfig::from_toml_file(&config_path)?;
    if previous != *cfg {
        bail!(
            "{} holds a run with another configuration; remove it or choose another --out",
            cfg.out.display()
        );
    }
    let metrics_path = cfg.out.join("metrics.json");
    if metrics_path.exists() {
        let text = std::fs::read_to_string(&metrics_path)
            .with_context(|| format!("cannot read {}", metrics_path.display()))?;
        let saved: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", metrics_path.display()))?;
        let test: Metrics = serde_json::from_value(saved["test"].clone())
            .with_context(|| format!("{} has no test metrics", metrics_path.display()))?;
        return Ok(PreviousRun::Finished(test));
    }
    if state::has_checkpoint(&cfg.out) {
        Ok(PreviousRun::Interrupted)
    } else {
        Ok(PreviousRun::None)
    }
}

/// Mean and sample (n - 1) standard deviation; sd is 0 for a single value.
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    #[test]
    fn mean_sd_uses_sample_deviation() {
        let (m, s) = super::mean_sd(&[0.5, 0.7, 0.6]);
        assert!((m - 0.6).abs() < 1e-12);
        assert!((s - 0.1).abs() < 1e-12);
        assert_eq!(super::mean_sd(&[0.3]), (0.3, 0.0));
    }
}
