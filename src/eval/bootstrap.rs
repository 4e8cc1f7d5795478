//! Confidence intervals of test metrics by the percentile bootstrap over sequences.
//!
//! A GUE test set holds about 1,000 sequences, so its MCC is uncertain by a few points before any
//! training noise: a gap to a published figure, or between two runs, means little without that
//! width. Resampling the sequences with replacement and recomputing each metric gives it without
//! assuming a distribution, for every metric alike (MCC and AUPRC have no simple formula).

use std::collections::BTreeMap;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::metrics::{try_compute_metrics, Metrics};

/// Resamples drawn for the intervals a run reports: the 2.5 and 97.5 percentiles of 1,000 draws
/// move by well under their width between seeds.
pub const RESAMPLES: usize = 1000;
/// The seed of those draws: fixed, so `eval` on a run's test set repeats the run's intervals.
const SEED: u64 = 0x5EED;

/// Percentile-bootstrap intervals of the metrics of one set of predictions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Intervals {
    /// Coverage, 0.95 for 95 % intervals.
    pub level: f64,
    pub resamples: usize,
    /// `[low, high]` per metric name of [`Metrics::NAMES`]; a metric without a value in most
    /// resamples (AUROC when resamples lack a class) is left out.
    #[serde(flatten)]
    pub bounds: BTreeMap<String, [f64; 2]>,
}

impl Intervals {
    /// The interval of `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<[f64; 2]> {
        self.bounds.get(name).copied()
    }
}

/// 95 % intervals of every metric of `probs` (row-major `labels.len() x num_classes`) against
/// `labels`, from [`RESAMPLES`] resamples with the fixed seed.
pub fn test_intervals(labels: &[usize], probs: &[f32], num_classes: usize) -> Result<Intervals> {
    bootstrap_intervals(labels, probs, num_classes, 0.95, RESAMPLES, SEED)
}

/// `level` intervals from `resamples` resamples of the sequences with replacement. Each resample
/// has its own generator seeded from `seed` and its index, so the result does not depend on the
/// thread count.
pub fn bootstrap_intervals(
    labels: &[usize],
    probs: &[f32],
    num_classes: usize,
    level: f64,
    resamples: usize,
    seed: u64,
) -> Result<Intervals> {
    // Validates shapes and labels once, with the message compute_metrics gives.
    try_compute_metrics(labels, probs, num_classes)?;
    let n = labels.len();
    let draws: Vec<Metrics> = (0..resamples)
        .into_par_iter()
        .map(|r| {
            let mut sample_labels = Vec::with_capacity(n);
            let mut sample_probs = Vec::with_capacity(n * num_classes);
            for i in resample(n, seed, r) {
                sample_labels.push(labels[i]);
                sample_probs.extend_from_slice(&probs[i * num_classes..(i + 1) * num_classes]);
            }
            try_compute_metrics(&sample_labels, &sample_probs, num_classes)
        })
        .collect::<Result<_>>()?;
    let tail = (1.0 - level) / 2.0;
    let mut bounds = BTreeMap::new();
    for name in Metrics::NAMES {
        let mut values: Vec<f64> = draws.iter().filter_map(|m| m.get(name)).collect();
        if values.is_empty() || values.len() * 2 < resamples {
            continue;
        }
        values.sort_by(f64::total_cmp);
        bounds.insert(
            name.to_string(),
            [quantile(&values, tail), quantile(&values, 1.0 - tail)],
        );
    }
    Ok(Intervals {
        level,
        resamples,
        bounds,
    })
}

/// Resample `r` of `n` items with replacement: indices from a generator seeded by `seed` and
/// `r`, so a resample does not depend on which thread draws it.
pub(super) fn resample(n: usize, seed: u64, r: usize) -> impl Iterator<Item = usize> {
    let mut rng = StdRng::seed_from_u64(seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..n).map(move |_| rng.random_range(0..n))
}

/// The `q` quantile of sorted `values`, interpolating linearly between neighbours (NumPy's
/// default).
pub(super) fn quantile(values: &[f64], q: f64) -> f64 {
    let position = q * (values.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(values.len() - 1);
    let weight = position - below as f64;
    values[below] + weight * (values[above] - values[below])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binary predictions of `n` sequences, half positive, whose positives score higher on
    /// average: labels and softmax rows.
    fn noisy_binary(n: usize, separation: f64, seed: u64) -> (Vec<usize>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut labels = Vec::new();
        let mut probs = Vec::new();
        for i in 0..n {
            let label = i % 2;
            // A logistic score: the class shifts the mean, a uniform draw's logit adds noise.
            let u: f64 = rng.random_range(1e-6..1.0 - 1e-6);
            let logit = (u / (1.0 - u)).ln() + if label == 1 { separation } else { -separation };
            let p1 = 1.0 / (1.0 + (-logit).exp());
            labels.push(label);
            probs.extend([(1.0 - p1) as f32, p1 as f32]);
        }
        (labels, probs)
    }

    #[test]
    fn accuracy_interval_matches_the_binomial_width() {
        // An independent reference: the normal approximation to the binomial, 1.96 sqrt(p(1-p)/n).
        let (labels, probs) = noisy_binary(4000, 1.5, 1);
        let point = try_compute_metrics(&labels, &probs, 2).unwrap();
        let intervals = bootstrap_intervals(&labels, &probs, 2, 0.95, 2000, 3).unwrap();
        let [low, high] = intervals.get("accuracy").unwrap();
        let p = point.accuracy;
        let expected = 2.0 * 1.96 * (p * (1.0 - p) / 4000.0).sqrt();
        let width = high - low;
        assert!(
            (width / expected - 1.0).abs() < 0.1,
            "bootstrap width {width:.5}, binomial width {expected:.5}"
        );
        assert!(
            (0.5 * (low + high) - p).abs() < 0.2 * expected,
            "centred on the point estimate"
        );
    }

    #[test]
    fn auroc_interval_matches_hanley_mcneil() {
        // Hanley and McNeil (1982): the standard error of an AUROC A from n1 positives and n0
        // negatives, with Q1 = A / (2 - A) and Q2 = 2 A^2 / (1 + A).
        let (labels, probs) = noisy_binary(3000, 1.0, 5);
        let a = try_compute_metrics(&labels, &probs, 2)
            .unwrap()
            .auroc
            .unwrap();
        let (n1, n0) = (1500.0, 1500.0);
        let (q1, q2) = (a / (2.0 - a), 2.0 * a * a / (1.0 + a));
        let se = ((a * (1.0 - a) + (n1 - 1.0) * (q1 - a * a) + (n0 - 1.0) * (q2 - a * a))
            / (n1 * n0))
            .sqrt();
        let intervals = bootstrap_intervals(&labels, &probs, 2, 0.95, 2000, 11).unwrap();
        let [low, high] = intervals.get("auroc").unwrap();
        let width = high - low;
        assert!(
            (width / (2.0 * 1.96 * se) - 1.0).abs() < 0.15,
            "bootstrap width {width:.5}, Hanley-McNeil width {:.5}",
            2.0 * 1.96 * se
        );
    }

    #[test]
    fn intervals_hold_the_estimate_narrow_with_n_and_repeat() {
        let (labels, probs) = noisy_binary(400, 1.0, 2);
        let point = try_compute_metrics(&labels, &probs, 2).unwrap();
        let small = test_intervals(&labels, &probs, 2).unwrap();
        assert_eq!(small, test_intervals(&labels, &probs, 2).unwrap());
        for name in Metrics::NAMES.iter().filter(|&&name| name != "loss") {
            let [low, high] = small.get(name).unwrap();
            let value = point.get(name).unwrap();
            assert!(
                low < value && value < high,
                "{name}: {value} outside [{low}, {high}]"
            );
        }
        assert!(small.get("loss").is_none(), "no loss without a trainer");
        let (labels, probs) = noisy_binary(6400, 1.0, 2);
        let large = test_intervals(&labels, &probs, 2).unwrap();
        let width = |i: &Intervals| i.get("mcc").map(|[l, h]| h - l).unwrap();
        // Sixteen times the sequences: about a quarter of the width.
        let ratio = width(&large) / width(&small);
        assert!((0.18..0.32).contains(&ratio), "width ratio {ratio}");
    }

    #[test]
    fn perfect_calls_have_no_width_and_bad_shapes_are_errors() {
        let labels = vec![0, 1, 2, 0, 1, 2];
        let mut probs = Vec::new();
        for &l in &labels {
            let mut row = [0.1f32; 3];
            row[l] = 0.8;
            probs.extend(row);
        }
        let intervals = test_intervals(&labels, &probs, 3).unwrap();
        assert_eq!(intervals.get("accuracy"), Some([1.0, 1.0]));
        assert!(test_intervals(&labels, &probs[1..], 3).is_err());
        let json = serde_json::to_value(&intervals).unwrap();
        assert_eq!(json["accuracy"], serde_json::json!([1.0, 1.0]));
        assert_eq!(json["resamples"], serde_json::json!(RESAMPLES));
    }
}
