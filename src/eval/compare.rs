//! Whether one model beats another on the same labelled sequences: the paired bootstrap.
//!
//! Two runs scored on one test set make errors on many of the same sequences, so the
//! uncertainty of their difference is much smaller than either run's interval suggests.
//! Resampling the sequences once for both runs keeps that pairing: the spread of the
//! resampled differences gives the difference's interval and a two-sided p-value, for every
//! metric alike.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::metrics::{try_compute_metrics, Metrics};

/// Predictions of labelled sequences as `predict`-style CSV files hold them (`test_predictions.csv`,
/// `cv_predictions.csv`): an id, the true label and one probability column per class.
#[derive(Debug)]
pub struct LabelledPredictions {
    pub path: PathBuf,
    pub ids: Vec<String>,
    pub labels: Vec<usize>,
    /// Row-major `ids.len() x num_classes`.
    pub probs: Vec<f32>,
    pub num_classes: usize,
}

/// The predictions file of `path`: the file itself, or in a run directory its
/// `cv_predictions.csv` (a cross-validation) or else its `test_predictions.csv`.
pub fn predictions_file(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    ["cv_predictions.csv", "test_predictions.csv"]
        .iter()
        .map(|name| path.join(name))
        .find(|file| file.exists())
        .with_context(|| {
            format!(
                "{} has neither cv_predictions.csv nor test_predictions.csv; is it a finished run?",
                path.display()
            )
        })
}

/// Reads a predictions CSV with `id`, `label` and `prob_0`, `prob_1`, ... columns; every row
/// needs a label.
pub fn read_labelled_predictions(path: &Path) -> Result<LabelledPredictions> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let header = reader
        .headers()
        .with_context(|| format!("{}: cannot read the header", path.display()))?
        .clone();
    let column = |name: &str| header.iter().position(|h| h == name);
    let (Some(id_col), Some(label_col)) = (column("id"), column("label")) else {
        bail!(
            "{}: needs `id` and `label` columns (labelled predictions such as a run's \
             test_predictions.csv); found {:?}",
            path.display(),
            header.iter().collect::<Vec<_>>()
        );
    };
    let prob_cols: Vec<usize> = (0..).map_while(|c| column(&format!("prob_{c}"))).collect();
    if prob_cols.len() < 2 {
        bail!(
            "{}: needs a probability column per class (`prob_0`, `prob_1`, ...)",
            path.display()
        );
    }
    let mut predictions = LabelledPredictions {
        path: path.to_path_buf(),
        ids: Vec::new(),
        labels: Vec::new(),
        probs: Vec::new(),
        num_classes: prob_cols.len(),
    };
    for (i, row) in reader.records().enumerate() {
        // Line numbers count the header as line 1.
        let line = i + 2;
        let row = row.with_context(|| format!("{} line {line}", path.display()))?;
        let label = row[label_col].parse::<usize>().with_context(|| {
            format!(
                "{} line {line}: label {:?} is not a class number",
                path.display(),
                &row[label_col]
            )
        })?;
        predictions.ids.push(row[id_col].to_string());
        predictions.labels.push(label);
        for &c in &prob_cols {
            let p = row[c].parse::<f32>().with_context(|| {
                format!(
                    "{} line {line}: probability {:?} is not a number",
                    path.display(),
                    &row[c]
                )
            })?;
            predictions.probs.push(p);
        }
    }
    Ok(predictions)
}

/// One metric of two sets of predictions and their paired-bootstrap difference.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MetricDifference {
    pub metric: String,
    pub a: f64,
    pub b: f64,
    /// `b - a` on all sequences.
    pub difference: f64,
    /// The `level` percentile interval of the resampled differences.
    pub low: f64,
    pub high: f64,
    /// Two-sided: twice the fraction of resampled differences on the far side of zero (at
    /// most 1); below `1 / resamples` it means "smaller than the resamples can tell".
    pub p_value: f64,
}

/// The paired bootstrap of `b` against `a`: both must hold the same sequences (matched by id, in
/// any order) with the same labels. Each resample draws the sequences once for both.
pub fn paired_bootstrap(
    a: &LabelledPredictions,
    b: &LabelledPredictions,
    level: f64,
    resamples: usize,
    seed: u64,
) -> Result<Vec<MetricDifference>> {
    let b_order = align(a, b)?;
    let k = a.num_classes;
    let b_probs: Vec<f32> = b_order
        .iter()
        .flat_map(|&j| b.probs[j * k..(j + 1) * k].iter().copied())
        .collect();
    let point_a = try_compute_metrics(&a.labels, &a.probs, k)
        .with_context(|| a.path.display().to_string())?;
    let point_b = try_compute_metrics(&a.labels, &b_probs, k)
        .with_context(|| b.path.display().to_string())?;
    let n = a.labels.len();
    let draws: Vec<(Metrics, Metrics)> = (0..resamples)
        .into_par_iter()
        .map(|r| {
            let mut labels = Vec::with_capacity(n);
            let (mut pa, mut pb) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
            for i in super::bootstrap::resample(n, seed, r) {
                labels.push(a.labels[i]);
                pa.extend_from_slice(&a.probs[i * k..(i + 1) * k]);
                pb.extend_from_slice(&b_probs[i * k..(i + 1) * k]);
            }
            Ok((
                try_compute_metrics(&labels, &pa, k)?,
                try_compute_metrics(&labels, &pb, k)?,
            ))
        })
        .collect::<Result<_>>()?;
    let tail = (1.0 - level) / 2.0;
    let mut result = Vec::new();
    for name in Metrics::NAMES {
        let (Some(va), Some(vb)) = (point_a.get(name), point_b.get(name)) else {
            continue;
        };
        let mut differences: Vec<f64> = draws
            .iter()
            .filter_map(|(da, db)| Some(db.get(name)? - da.get(name)?))
            .collect();
        if differences.len() * 2 < resamples {
            continue;
        }
        differences.sort_by(f64::total_cmp);
        let m = differences.len() as f64;
        let at_or_below = differences.iter().filter(|&&d| d <= 0.0).count() as f64;
        let at_or_above = differences.iter().filter(|&&d| d >= 0.0).count() as f64;
        result.push(MetricDifference {
            metric: name.to_string(),
            a: va,
            b: vb,
            difference: vb - va,
            low: super::bootstrap::quantile(&differences, tail),
            high: super::bootstrap::quantile(&differences, 1.0 - tail),
            p_value: (2.0 * at_or_below.min(at_or_above) / m).min(1.0),
        });
    }
    Ok(result)
}

/// For each of `a`'s rows, the row of `b` with its id; an error when the two do not hold the
/// same sequences with the same labels and classes.
fn align(a: &LabelledPredictions, b: &LabelledPredictions) -> Result<Vec<usize>> {
    if a.num_classes != b.num_classes {
        bail!(
            "{} has {} classes, {} {}",
            a.path.display(),
            a.num_classes,
            b.path.display(),
            b.num_classes
        );
    }
    id_index(a)?;
    let in_b = id_index(b)?;
    let mut order = Vec::with_capacity(a.ids.len());
    for (i, id) in a.ids.iter().enumerate() {
        let Some(&j) = in_b.get(id.as_str()) else {
            bail!(
                "`{id}` of {} is not in {}; compare predictions of the same sequences",
                a.path.display(),
                b.path.display()
            );
        };
        if a.labels[i] != b.labels[j] {
            bail!(
                "`{id}` has label {} in {} but {} in {}",
                a.labels[i],
                a.path.display(),
                b.labels[j],
                b.path.display()
            );
        }
        order.push(j);
    }
    if b.ids.len() != a.ids.len() {
        bail!(
            "{} holds {} sequences, {} {}; compare predictions of the same sequences",
            b.path.display(),
            b.ids.len(),
            a.path.display(),
            a.ids.len()
        );
    }
    Ok(order)
}

/// Each id's row; an error on a repeated id.
fn id_index(p: &LabelledPredictions) -> Result<HashMap<&str, usize>> {
    let mut map = HashMap::with_capacity(p.ids.len());
    for (i, id) in p.ids.iter().enumerate() {
        if map.insert(id.as_str(), i).is_some() {
            bail!(
                "{}: id `{id}` appears twice; pairing needs unique ids",
                p.path.display()
            );
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn predictions(
        name: &str,
        ids: &[String],
        labels: &[usize],
        p1: &[f32],
    ) -> LabelledPredictions {
        LabelledPredictions {
            path: PathBuf::from(name),
            ids: ids.to_vec(),
            labels: labels.to_vec(),
            probs: p1.iter().flat_map(|&p| [1.0 - p, p]).collect(),
            num_classes: 2,
        }
    }

    /// Two classifiers of `n` balanced sequences, right with probability `right_a` and
    /// `right_b`. Their errors are correlated, as two models' are on the same hard sequences:
    /// most sequences have one difficulty for both.
    fn two_classifiers(
        n: usize,
        right_a: f64,
        right_b: f64,
    ) -> (LabelledPredictions, LabelledPredictions) {
        let mut rng = StdRng::seed_from_u64(9);
        let ids: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
        let (mut pa, mut pb) = (Vec::new(), Vec::new());
        for &label in &labels {
            let shared: f64 = rng.random();
            for (right, probs) in [(right_a, &mut pa), (right_b, &mut pb)] {
                let difficulty = if rng.random_bool(0.8) {
                    shared
                } else {
                    rng.random()
                };
                let confidence: f32 = rng.random_range(0.55..0.95);
                let toward_one = (label == 1) == (difficulty < right);
                probs.push(if toward_one {
                    confidence
                } else {
                    1.0 - confidence
                });
            }
        }
        (
            predictions("a.csv", &ids, &labels, &pa),
            predictions("b.csv", &ids, &labels, &pb),
        )
    }

    #[test]
    fn accuracy_difference_matches_the_paired_normal_width() {
        // An independent reference: the variance of a paired difference of proportions from
        // the discordant counts (as in McNemar's test), (f + g - (f - g)^2 / n) / n^2, with f
        // sequences only A gets right and g only B.
        let (a, b) = two_classifiers(3000, 0.75, 0.8);
        let right =
            |p: &LabelledPredictions, i: usize| (p.probs[2 * i + 1] > 0.5) == (p.labels[i] == 1);
        let n = 3000.0;
        let f = (0..3000).filter(|&i| right(&a, i) && !right(&b, i)).count() as f64;
        let g = (0..3000).filter(|&i| !right(&a, i) && right(&b, i)).count() as f64;
        let sd = ((f + g - (f - g).powi(2) / n) / (n * n)).sqrt();
        let result = paired_bootstrap(&a, &b, 0.95, 2000, 1).unwrap();
        let accuracy = result.iter().find(|d| d.metric == "accuracy").unwrap();
        assert!((accuracy.difference - (g - f) / n).abs() < 1e-12);
        let width = accuracy.high - accuracy.low;
        assert!(
            (width / (2.0 * 1.96 * sd) - 1.0).abs() < 0.1,
            "bootstrap width {width:.5}, paired normal width {:.5}",
            2.0 * 1.96 * sd
        );
        // Five points of accuracy on 3,000 sequences: far beyond chance.
        assert!(
            accuracy.low > 0.0 && accuracy.p_value < 0.01,
            "{accuracy:?}"
        );
    }

    #[test]
    fn identical_predictions_differ_by_nothing_and_row_order_does_not_matter() {
        let (a, b) = two_classifiers(500, 0.7, 0.72);
        let same = paired_bootstrap(&a, &a, 0.95, 500, 2).unwrap();
        for d in &same {
            assert_eq!(
                (d.difference, d.low, d.high, d.p_value),
                (0.0, 0.0, 0.0, 1.0),
                "{d:?}"
            );
        }
        // The same rows of B in reverse order give the same comparison.
        let reversed = LabelledPredictions {
            path: b.path.clone(),
            ids: b.ids.iter().rev().cloned().collect(),
            labels: b.labels.iter().rev().copied().collect(),
            probs: b.probs.chunks(2).rev().flatten().copied().collect(),
            num_classes: 2,
        };
        assert_eq!(
            paired_bootstrap(&a, &b, 0.95, 300, 3).unwrap(),
            paired_bootstrap(&a, &reversed, 0.95, 300, 3).unwrap()
        );
        // Close classifiers on few sequences: no call either way.
        let close = paired_bootstrap(&a, &b, 0.95, 1000, 4).unwrap();
        let mcc = close.iter().find(|d| d.metric == "mcc").unwrap();
        assert!(
            mcc.low < 0.0 && mcc.high > 0.0 && mcc.p_value > 0.05,
            "{mcc:?}"
        );
    }

    #[test]
    fn mismatched_sequences_are_errors_naming_them() {
        let (a, b) = two_classifiers(10, 0.7, 0.7);
        let mut relabelled = predictions("b.csv", &b.ids, &b.labels, &[0.5; 10]);
        relabelled.labels[3] = 1 - relabelled.labels[3];
        let err = paired_bootstrap(&a, &relabelled, 0.95, 10, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`s3` has label"), "{err}");
        let mut renamed = predictions("b.csv", &b.ids, &b.labels, &[0.5; 10]);
        renamed.ids[7] = "other".into();
        let err = paired_bootstrap(&a, &renamed, 0.95, 10, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`s7` of a.csv is not in b.csv"), "{err}");
        let mut doubled = predictions("b.csv", &b.ids, &b.labels, &[0.5; 10]);
        doubled.ids[1] = "s0".into();
        let err = paired_bootstrap(&a, &doubled, 0.95, 10, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`s0` appears twice"), "{err}");
        let fewer = predictions("a.csv", &b.ids[..9], &b.labels[..9], &[0.5; 9]);
        let err = paired_bootstrap(&fewer, &b, 0.95, 10, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("b.csv holds 10 sequences, a.csv 9"), "{err}");
    }
}
