//! Classification metrics from softmax outputs: threshold metrics from the argmax confusion matrix,
//! ranking metrics (AUROC, AUPRC) from the scores themselves.
//!
//! Definitions follow scikit-learn so numbers can be compared with published GUE results: binary
//! precision/recall/F1 are those of class 1, multiclass ones are macro averages, MCC is the
//! Gorodkin generalisation (equal to the usual binary MCC for two classes), AUPRC is average
//! precision (a step sum, not the over-optimistic trapezoid).

use std::cmp::Ordering;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Evaluation of one split. `confusion[t][p]` counts examples of true class `t` predicted as `p`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub n: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub mcc: f64,
    pub auroc: Option<f64>,
    pub auprc: Option<f64>,
    pub confusion: Vec<Vec<usize>>,
    /// Mean loss over the split; filled in by the trainer, which is the only one that knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
}

impl Metrics {
    /// Names accepted by [`Metrics::get`], e.g. for early stopping and best-checkpoint selection.
    pub const NAMES: &[&str] = &[
        "mcc",
        "accuracy",
        "f1",
        "precision",
        "recall",
        "auroc",
        "auprc",
        "loss",
    ];

    /// The metric called `name`; `None` for an unknown name or a metric that was not computable.
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "mcc" => Some(self.mcc),
            "accuracy" => Some(self.accuracy),
            "f1" => Some(self.f1),
            "precision" => Some(self.precision),
            "recall" => Some(self.recall),
            "auroc" => self.auroc,
            "auprc" => self.auprc,
            "loss" => self.loss,
            _ => None,
        }
    }

    /// Whether larger values of `name` are better (everything but the loss).
    pub fn higher_is_better(name: &str) -> bool {
        name != "loss"
    }

    /// Whether `candidate` strictly improves on `incumbent` for metric `name`; strict, so that the
    /// earliest of equally good evaluations stays the best one. NaN never improves.
    pub fn improves(name: &str, candidate: f64, incumbent: f64) -> bool {
        if Self::higher_is_better(name) {
            candidate > incumbent
        } else {
            candidate < incumbent
        }
    }

    /// Rejects a metric name that [`Metrics::get`] would not know, listing the valid ones; meant for
    /// validating configuration before a long run starts.
    pub fn check_name(name: &str) -> Result<()> {
        if Self::NAMES.contains(&name) {
            Ok(())
        } else {
            bail!(
                "unknown metric {name:?}; expected one of {}",
                Self::NAMES.join(", ")
            )
        }
    }
}

/// Metrics of `probs` (row-major `N x num_classes` softmax outputs) against `labels`.
///
/// # Panics
/// When the shapes disagree or a label is out of range: callers build both from the same batch,
/// so that is a bug, not bad user input. Use [`try_compute_metrics`] to get an error instead.
pub fn compute_metrics(labels: &[usize], probs: &[f32], num_classes: usize) -> Metrics {
    try_compute_metrics(labels, probs, num_classes).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`compute_metrics`] with shape and label checks reported as errors.
pub fn try_compute_metrics(labels: &[usize], probs: &[f32], num_classes: usize) -> Result<Metrics> {
    if num_classes < 2 {
        bail!("classification metrics need at least 2 classes, got {num_classes}");
    }
    if probs.len() != labels.len() * num_classes {
        bail!(
            "expected {} x {} = {} probabilities, got {}",
            labels.len(),
            num_classes,
            labels.len() * num_classes,
            probs.len()
        );
    }
    if let Some((i, &label)) = labels.iter().enumerate().find(|(_, &l)| l >= num_classes) {
        bail!("label {label} of example {i} is outside 0..{num_classes}");
    }
    let n = labels.len();
    let preds: Vec<usize> = probs.chunks_exact(num_classes).map(argmax).collect();
    let confusion = confusion_matrix(labels, &preds, num_classes);
    let correct: usize = (0..num_classes).map(|k| confusion[k][k]).sum();
    let accuracy = ratio(correct as f64, n as f64);
    let (precision, recall, f1) = if num_classes == 2 {
        class_prf(&confusion, 1)
    } else {
        macro_prf(&confusion)
    };
    let (auroc, auprc) = if num_classes == 2 {
        let positive: Vec<bool> = labels.iter().map(|&l| l == 1).collect();
        let scores: Vec<f32> = probs.chunks_exact(2).map(|row| row[1]).collect();
        (
            auroc(&positive, &scores),
            average_precision(&positive, &scores),
        )
    } else {
        one_vs_rest(labels, probs, num_classes)
    };
    Ok(Metrics {
        n,
        accuracy,
        precision,
        recall,
        f1,
        mcc: mcc(&confusion),
        auroc,
        auprc,
        confusion,
        loss: None,
    })
}

/// Index of the largest entry, the first one on ties; NaN entries never win.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best
}

/// `a / b`, or 0 when `b` is 0 (scikit-learn's `zero_division=0`).
fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

/// Counts `[true][pred]`; all labels and predictions must be below `num_classes`.
pub fn confusion_matrix(labels: &[usize], preds: &[usize], num_classes: usize) -> Vec<Vec<usize>> {
    let mut confusion = vec![vec![0; num_classes]; num_classes];
    for (&t, &p) in labels.iter().zip(preds) {
        confusion[t][p] += 1;
    }
    confusion
}

/// Precision, recall and F1 of class `k`.
fn class_prf(confusion: &[Vec<usize>], k: usize) -> (f64, f64, f64) {
    let tp = confusion[k][k] as f64;
    let predicted: usize = confusion.iter().map(|row| row[k]).sum();
    let actual: usize = confusion[k].iter().sum();
    let precision = ratio(tp, predicted as f64);
    let recall = ratio(tp, actual as f64);
    (
        precision,
        recall,
        ratio(2.0 * precision * recall, precision + recall),
    )
}

/// Unweighted means over the classes that occur among labels or predictions, as scikit-learn's
/// `average="macro"` does; a class absent from both would only add a meaningless zero.
fn macro_prf(confusion: &[Vec<usize>]) -> (f64, f64, f64) {
    let present: Vec<usize> = (0..confusion.len())
        .filter(|&k| {
            confusion[k].iter().sum::<usize>() + confusion.iter().map(|r| r[k]).sum::<usize>() > 0
        })
        .collect();
    let (mut p, mut r, mut f) = (0.0, 0.0, 0.0);
    for &k in &present {
        let (pk, rk, fk) = class_prf(confusion, k);
        p += pk;
        r += rk;
        f += fk;
    }
    let m = present.len() as f64;
    (ratio(p, m), ratio(r, m), ratio(f, m))
}

/// Matthews correlation coefficient of a `K x K` confusion matrix (Gorodkin's R_K):
/// `(c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))` with `c` correct,
/// `s` total, `t_k`/`p_k` true/predicted counts of class `k`; 0 when a factor of the denominator is 0.
pub fn mcc(confusion: &[Vec<usize>]) -> f64 {
    let k = confusion.len();
    let s: f64 = confusion.iter().flatten().map(|&v| v as f64).sum();
    let c: f64 = (0..k).map(|i| confusion[i][i] as f64).sum();
    let t: Vec<f64> = confusion
        .iter()
        .map(|row| row.iter().sum::<usize>() as f64)
        .collect();
    let p: Vec<f64> = (0..k)
        .map(|j| confusion.iter().map(|row| row[j]).sum::<usize>() as f64)
        .collect();
    let pt: f64 = p.iter().zip(&t).map(|(a, b)| a * b).sum();
    let pp: f64 = p.iter().map(|a| a * a).sum();
    let tt: f64 = t.iter().map(|a| a * a).sum();
    let den = (s * s - pp) * (s * s - tt);
    if den <= 0.0 {
        0.0
    } else {
        ((c * s - pt) / den.sqrt()).clamp(-1.0, 1.0)
    }
}

/// Macro one-vs-rest AUROC and AUPRC over the classes that have both positives and negatives.
fn one_vs_rest(labels: &[usize], probs: &[f32], num_classes: usize) -> (Option<f64>, Option<f64>) {
    let (mut roc, mut pr) = (Vec::new(), Vec::new());
    for k in 0..num_classes {
        let positive: Vec<bool> = labels.iter().map(|&l| l == k).collect();
        let scores: Vec<f32> = probs.chunks_exact(num_classes).map(|row| row[k]).collect();
        if let (Some(a), Some(b)) = (
            auroc(&positive, &scores),
            average_precision(&positive, &scores),
        ) {
            roc.push(a);
            pr.push(b);
        }
    }
    let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    (mean(roc), mean(pr))
}

/// Cumulative (true positives, false positives) after each distinct score, from the highest
/// score down; equal scores form one threshold so ties are never split arbitrarily.
fn threshold_counts(labels: &[bool], scores: &[f32]) -> Vec<(usize, usize)> {
    assert_eq!(
        labels.len(),
        scores.len(),
        "ranking metrics need one score per label"
    );
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut counts: Vec<(usize, usize)> = Vec::new();
    let (mut tp, mut fp) = (0, 0);
    for (pos, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_group = order
            .get(pos + 1)
            .is_none_or(|&j| scores[j].total_cmp(&scores[i]) != Ordering::Equal);
        if last_of_group {
            counts.push((tp, fp));
        }
    }
    counts
}

/// ROC curve as `(false positive rate, true positive rate)` points from `(0, 0)` to `(1, 1)`, one
/// per distinct score. Without both positives and negatives the rates are undefined and the
/// chance diagonal `[(0, 0), (1, 1)]` is returned.
///
/// # Panics
/// When `labels` and `scores` differ in length.
pub fn roc_curve(labels: &[bool], scores: &[f32]) -> Vec<(f64, f64)> {
    let counts = threshold_counts(labels, scores);
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return vec![(0.0, 0.0), (1.0, 1.0)];
    }
    std::iter::once((0.0, 0.0))
        .chain(
            counts
                .iter()
                .map(|&(tp, fp)| (fp as f64 / negatives, tp as f64 / positives)),
        )
        .collect()
}

/// Precision-recall curve as `(recall, precision)` points in order of increasing recall, starting
/// at `(0, 1)` and stopping at the first threshold that reaches full recall (as scikit-learn
/// does). Empty when there are no positives, since recall is then undefined.
///
/// # Panics
/// When `labels` and `scores` differ in length.
pub fn pr_curve(labels: &[bool], scores: &[f32]) -> Vec<(f64, f64)> {
    let counts = threshold_counts(labels, scores);
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 {
        return Vec::new();
    }
    let mut points = vec![(0.0, 1.0)];
    for &(tp, fp) in &counts {
        points.push((tp as f64 / positives as f64, tp as f64 / (tp + fp) as f64));
        if tp == positives {
            break;
        }
    }
    points
}

/// Area under the ROC curve (trapezoids over tie-grouped thresholds, which equals the probability
/// that a random positive outscores a random negative with ties counting one half); `None` unless
/// both classes occur.
pub fn auroc(labels: &[bool], scores: &[f32]) -> Option<f64> {
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 || positives == labels.len() {
        return None;
    }
    let curve = roc_curve(labels, scores);
    Some(
        curve
            .windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
            .sum(),
    )
}

/// Average precision `sum_n (R_n - R_{n-1}) P_n` over tie-grouped thresholds; `None` unless both
/// classes occur (with no negatives it would trivially be 1, which says nothing about the model).
pub fn average_precision(labels: &[bool], scores: &[f32]) -> Option<f64> {
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 || positives == labels.len() {
        return None;
    }
    let curve = pr_curve(labels, scores);
    Some(curve.windows(2).map(|w| (w[1].0 - w[0].0) * w[1].1).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// Labels and confident one-hot-like probabilities realising `confusion[t][p]`.
    fn from_confusion(confusion: &[Vec<usize>]) -> (Vec<usize>, Vec<f32>) {
        let k = confusion.len();
        let (mut labels, mut probs) = (Vec::new(), Vec::new());
        for (t, row) in confusion.iter().enumerate() {
            for (p, &count) in row.iter().enumerate() {
                for _ in 0..count {
                    labels.push(t);
                    probs.extend((0..k).map(|j| if j == p { 0.9 } else { 0.1 / (k - 1) as f32 }));
                }
            }
        }
        (labels, probs)
    }

    #[test]
    fn binary_threshold_metrics_by_hand() {
        // TN=4 FP=2 / FN=1 TP=3, n=10.
        // accuracy = (3+4)/10 = 0.7; precision = 3/(3+2) = 0.6; recall = 3/(3+1) = 0.75;
        // F1 = 2*0.6*0.75/(0.6+0.75) = 0.9/1.35 = 2/3;
        // MCC = (TP*TN - FP*FN)/sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12-2)/sqrt(5*4*6*5) = 10/sqrt(600).
        let confusion = vec![vec![4, 2], vec![1, 3]];
        let (labels, probs) = from_confusion(&confusion);
        let m = compute_metrics(&labels, &probs, 2);
        assert_eq!(m.n, 10);
        assert_eq!(m.confusion, confusion);
        assert!(close(m.accuracy, 0.7));
        assert!(close(m.precision, 0.6));
        assert!(close(m.recall, 0.75));
        assert!(close(m.f1, 2.0 / 3.0));
        assert!(close(m.mcc, 10.0 / 600f64.sqrt()));
        assert_eq!(m.loss, None);
    }

    #[test]
    fn mcc_extremes() {
        let labels = [0, 1, 1, 0, 1, 0, 0, 1];
        let onehot = |c: usize| if c == 1 { [0.2f32, 0.8] } else { [0.7, 0.3] };
        let perfect: Vec<f32> = labels.iter().flat_map(|&l| onehot(l)).collect();
        let inverted: Vec<f32> = labels.iter().flat_map(|&l| onehot(1 - l)).collect();
        let constant: Vec<f32> = labels.iter().flat_map(|_| onehot(1)).collect();
        assert!(close(compute_metrics(&labels, &perfect, 2).mcc, 1.0));
        assert!(close(compute_metrics(&labels, &inverted, 2).mcc, -1.0));
        let m = compute_metrics(&labels, &constant, 2);
        assert_eq!(m.mcc, 0.0);
        assert!(close(m.accuracy, 0.5));
        // Perfect ranking gives AUROC 1, inverted gives 0.
        assert_eq!(compute_metrics(&labels, &perfect, 2).auroc, Some(1.0));
        assert_eq!(compute_metrics(&labels, &inverted, 2).auroc, Some(0.0));
    }

    #[test]
    fn multiclass_metrics_by_hand() {
        // confusion (rows true, cols predicted):
        //   [3 0 1]   t = row sums = [4, 3, 3]
        //   [2 1 0]   p = col sums = [5, 2, 3]
        //   [0 1 2]   c = trace = 6, s = 10
        // sum p_k t_k = 20+6+9 = 35; sum p^2 = 25+4+9 = 38; sum t^2 = 16+9+9 = 34
        // MCC = (6*10 - 35)/sqrt((100-38)(100-34)) = 25/sqrt(62*66) = 25/sqrt(4092)
        // precision per class = 3/5, 1/2, 2/3 -> macro 0.6+0.5+0.6667 / 3
        // recall per class    = 3/4, 1/3, 2/3
        // F1 per class = 2/3, 2*(1/2)(1/3)/(5/6) = 0.4, 2/3
        let confusion = vec![vec![3, 0, 1], vec![2, 1, 0], vec![0, 1, 2]];
        let (labels, probs) = from_confusion(&confusion);
        let m = compute_metrics(&labels, &probs, 3);
        assert_eq!(m.confusion, confusion);
        assert!(close(m.accuracy, 0.6));
        assert!(close(m.mcc, 25.0 / 4092f64.sqrt()));
        assert!(close(m.precision, (0.6 + 0.5 + 2.0 / 3.0) / 3.0));
        assert!(close(m.recall, (0.75 + 1.0 / 3.0 + 2.0 / 3.0) / 3.0));
        assert!(close(m.f1, (2.0 / 3.0 + 0.4 + 2.0 / 3.0) / 3.0));
        assert!(m.auroc.is_some() && m.auprc.is_some());
    }

    #[test]
    fn binary_mcc_matches_textbook_formula_on_random_matrices() {
        for (tn, fp, fn_, tp) in [(5, 3, 2, 7), (0, 4, 1, 9), (10, 1, 8, 2), (3, 3, 3, 3)] {
            let m = mcc(&[vec![tn, fp], vec![fn_, tp]]);
            let (tn, fp, fn_, tp) = (tn as f64, fp as f64, fn_ as f64, tp as f64);
            let den = ((tp + fp) * (tp + fn_) * (tn + fp) * (tn + fn_)).sqrt();
            let expected = if den == 0.0 {
                0.0
            } else {
                (tp * tn - fp * fn_) / den
            };
            assert!(close(m, expected), "{m} vs {expected}");
        }
    }

    #[test]
    fn auroc_with_ties_matches_pairwise_count() {
        let labels = [
            true, false, true, true, false, false, true, false, false, true,
        ];
        let scores = [0.9f32, 0.9, 0.5, 0.3, 0.3, 0.3, 0.7, 0.1, 0.5, 0.2];
        // Independent reference: count positive-negative pairs, ties worth one half.
        let (mut wins, mut pairs) = (0.0, 0.0);
        for i in 0..labels.len() {
            for j in 0..labels.len() {
                if labels[i] && !labels[j] {
                    pairs += 1.0;
                    if scores[i] > scores[j] {
                        wins += 1.0;
                    } else if scores[i] == scores[j] {
                        wins += 0.5;
                    }
                }
            }
        }
        let got = auroc(&labels, &scores).unwrap();
        assert!(close(got, wins / pairs), "{got} vs {}", wins / pairs);
        // All scores equal: every pair is a tie.
        assert!(close(auroc(&labels, &[0.5; 10]).unwrap(), 0.5));
    }

    #[test]
    fn average_precision_scikit_learn_example() {
        // scikit-learn docs: average_precision_score([0,0,1,1], [0.1,0.4,0.35,0.8]) = 0.8333.
        // Thresholds 0.8: R=1/2 P=1; 0.4: R=1/2 P=1/2; 0.35: R=1 P=2/3 -> 0.5*1 + 0 + 0.5*2/3.
        let labels = [false, false, true, true];
        let ap = average_precision(&labels, &[0.1, 0.4, 0.35, 0.8]).unwrap();
        assert!(close(ap, 0.5 + 0.5 * 2.0 / 3.0));
    }

    #[test]
    fn average_precision_groups_ties() {
        // Scores 0.8 (pos), 0.6 (pos, neg tied), 0.2 (pos, neg).
        // Threshold 0.8: TP=1 FP=0 -> R=1/3, P=1
        // Threshold 0.6: TP=2 FP=1 -> R=2/3, P=2/3
        // Threshold 0.2: TP=3 FP=2 -> R=1,   P=3/5
        // AP = 1/3*1 + 1/3*2/3 + 1/3*3/5 = (1 + 2/3 + 3/5)/3
        let labels = [true, true, false, true, false];
        let scores = [0.8f32, 0.6, 0.6, 0.2, 0.2];
        let ap = average_precision(&labels, &scores).unwrap();
        assert!(close(ap, (1.0 + 2.0 / 3.0 + 0.6) / 3.0));
        let curve = pr_curve(&labels, &scores);
        assert_eq!(curve.len(), 4);
        assert_eq!(curve[0], (0.0, 1.0));
        assert!(close(curve[3].0, 1.0) && close(curve[3].1, 0.6));
    }

    #[test]
    fn roc_curve_endpoints_and_monotone() {
        let labels = [true, false, true, false, false, true, true, false];
        let scores = [0.3f32, 0.3, 0.9, 0.1, 0.6, 0.6, 0.05, 0.2];
        let curve = roc_curve(&labels, &scores);
        assert_eq!(curve.first(), Some(&(0.0, 0.0)));
        assert_eq!(curve.last(), Some(&(1.0, 1.0)));
        // One point per distinct score plus the origin: 0.9, 0.6, 0.3, 0.2, 0.1, 0.05.
        assert_eq!(curve.len(), 7);
        for w in curve.windows(2) {
            assert!(w[1].0 >= w[0].0 && w[1].1 >= w[0].1, "not monotone: {w:?}");
        }
        assert_eq!(
            roc_curve(&[true, true], &[0.1, 0.2]),
            vec![(0.0, 0.0), (1.0, 1.0)]
        );
    }

    #[test]
    fn single_class_labels_have_no_ranking_metrics() {
        let m = compute_metrics(&[1, 1, 1], &[0.2, 0.8, 0.6, 0.4, 0.1, 0.9], 2);
        assert_eq!((m.auroc, m.auprc), (None, None));
        assert!(close(m.accuracy, 2.0 / 3.0));
        let m3 = compute_metrics(&[2, 2], &[0.1, 0.2, 0.7, 0.5, 0.3, 0.2], 3);
        assert_eq!((m3.auroc, m3.auprc), (None, None));
    }

    #[test]
    fn multiclass_one_vs_rest_skips_absent_classes() {
        // Class 2 never occurs in the labels, so only classes 0 and 1 are averaged; both are
        // ranked perfectly by their own column, so both areas are 1.
        let labels = [0, 1, 0, 1];
        let probs = [
            0.8f32, 0.1, 0.1, 0.2, 0.7, 0.1, 0.6, 0.3, 0.1, 0.3, 0.5, 0.2,
        ];
        let m = compute_metrics(&labels, &probs, 3);
        assert_eq!(m.auroc, Some(1.0));
        assert_eq!(m.auprc, Some(1.0));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let err = try_compute_metrics(&[0, 1], &[0.5; 3], 2).unwrap_err();
        assert!(err.to_string().contains("expected 2 x 2 = 4"), "{err}");
        let err = try_compute_metrics(&[0, 3], &[0.5; 4], 2).unwrap_err();
        assert!(err.to_string().contains("label 3 of example 1"), "{err}");
        assert!(try_compute_metrics(&[], &[], 1).is_err());
    }

    #[test]
    fn metric_names_round_trip_through_get() {
        let (labels, probs) = from_confusion(&[vec![2, 1], vec![1, 2]]);
        let mut m = compute_metrics(&labels, &probs, 2);
        m.loss = Some(0.25);
        for name in Metrics::NAMES {
            assert!(m.get(name).is_some(), "{name}");
            Metrics::check_name(name).unwrap();
        }
        assert_eq!(m.get("mcc"), Some(m.mcc));
        assert_eq!(m.get("loss"), Some(0.25));
        assert_eq!(m.get("nope"), None);
        assert!(Metrics::check_name("nope")
            .unwrap_err()
            .to_string()
            .contains("mcc"));
        assert!(!Metrics::higher_is_better("loss") && Metrics::higher_is_better("auroc"));
        assert!(Metrics::improves("loss", 0.1, 0.2) && !Metrics::improves("mcc", 0.1, 0.2));
        assert!(!Metrics::improves("mcc", f64::NAN, 0.2));
    }
}
