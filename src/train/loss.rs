//! The classification loss: cross-entropy, optionally weighted by class.

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use crate::train::config::ClassWeights;

/// The weight of each class, resolved against the training labels: `balanced` gives class `c`
/// the weight `n / (classes * n_c)`; no setting gives every class 1.
pub fn class_weights(
    setting: Option<&ClassWeights>,
    train_labels: &[usize],
    num_labels: usize,
) -> Result<Vec<f64>> {
    match setting {
        None => Ok(vec![1.0; num_labels]),
        Some(ClassWeights::Given(w)) => {
            if w.len() != num_labels {
                bail!(
                    "class_weights has {} entries but the data has {num_labels} classes",
                    w.len()
                );
            }
            Ok(w.clone())
        }
        Some(ClassWeights::Balanced) => {
            let mut counts = vec![0usize; num_labels];
            for &y in train_labels {
                counts[y] += 1;
            }
            if let Some(c) = counts.iter().position(|&n| n == 0) {
                bail!("class_weights = \"balanced\": class {c} has no training sequence");
            }
            let n = train_labels.len() as f64;
            Ok(counts
                .iter()
                .map(|&k| n / (num_labels as f64 * k as f64))
                .collect())
        }
    }
}

/// `sum_i w_i * -log softmax(logits_i)[label_i]`: the numerator of a weighted mean
/// cross-entropy, left to the caller to divide by the weights of the whole (accumulated) batch.
/// `sample_weights` holds one weight per row of `logits`.
pub fn weighted_nll_sum(
    logits: &Tensor,
    labels: &Tensor,
    sample_weights: &Tensor,
) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    let weights = sample_weights.to_dtype(picked.dtype())?;
    Ok((picked * weights)?.sum_all()?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn balanced_weights_give_each_class_the_same_total() {
        let labels = [0, 0, 0, 1, 2, 2];
        let w = class_weights(Some(&ClassWeights::Balanced), &labels, 3).unwrap();
        let totals: Vec<f64> = (0..3)
            .map(|c| labels.iter().filter(|&&y| y == c).count() as f64 * w[c])
            .collect();
        for t in &totals {
            assert!((t - 2.0).abs() < 1e-12, "{totals:?}");
        }
        assert_eq!(class_weights(None, &labels, 3).unwrap(), vec![1.0; 3]);
        let err = class_weights(Some(&ClassWeights::Balanced), &labels, 4).unwrap_err();
        assert!(
            err.to_string().contains("class 3 has no training sequence"),
            "{err}"
        );
        let err =
            class_weights(Some(&ClassWeights::Given(vec![1.0, 2.0])), &labels, 3).unwrap_err();
        assert!(
            err.to_string()
                .contains("2 entries but the data has 3 classes"),
            "{err}"
        );
    }

    /// Value and gradient against a float64 recomputation: d/dz_ic = w_i (softmax_ic - [c = y_i]).
    #[test]
    fn weighted_nll_matches_f64_value_and_gradient() {
        let dev = Device::Cpu;
        let (rows, classes) = (5, 3);
        let z: Vec<f32> = (0..rows * classes)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        let labels = [2u32, 0, 1, 1, 2];
        let w = [0.5f32, 3.0, 1.0, 1.0, 0.25];
        let logits = Var::from_vec(z.clone(), (rows, classes), &dev).unwrap();
        let loss = weighted_nll_sum(
            logits.as_tensor(),
            &Tensor::new(&labels, &dev).unwrap(),
            &Tensor::new(&w, &dev).unwrap(),
        )
        .unwrap();
        let grad = loss.backward().unwrap();
        let grad: Vec<f32> = grad
            .get(logits.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut want = 0f64;
        for i in 0..rows {
            let row: Vec<f64> = z[i * classes..(i + 1) * classes]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let norm: f64 = row.iter().map(|v| (v - max).exp()).sum();
            let y = labels[i] as usize;
            want += w[i] as f64 * -(row[y] - max - norm.ln());
            for c in 0..classes {
                let p = (row[c] - max).exp() / norm;
                let g = w[i] as f64 * (p - if c == y { 1.0 } else { 0.0 });
                assert!(
                    (grad[i * classes + c] as f64 - g).abs() < 1e-6,
                    "row {i} class {c}"
                );
            }
        }
        let got = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((got - want).abs() < 1e-5 * want.abs(), "{got} vs {want}");
    }

    /// Weight 2 on a class is the same loss as that class's rows appearing twice (candle's own
    /// unweighted cross-entropy on the duplicated batch).
    #[test]
    fn integer_weights_equal_duplicated_rows() {
        let dev = Device::Cpu;
        let z: Vec<f32> = (0..8).map(|i| (i as f32 * 0.9).sin() * 2.0).collect();
        let labels = [1u32, 0, 1, 0];
        let class_w = [1.0f32, 2.0];
        let w: Vec<f32> = labels.iter().map(|&y| class_w[y as usize]).collect();
        let logits = Tensor::from_vec(z.clone(), (4, 2), &dev).unwrap();
        let sum = weighted_nll_sum(
            &logits,
            &Tensor::new(&labels, &dev).unwrap(),
            &Tensor::new(w.as_slice(), &dev).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        let weighted_mean = sum / w.iter().sum::<f32>();
        let (mut rows, mut dup_labels) = (vec![], vec![]);
        for (i, &y) in labels.iter().enumerate() {
            for _ in 0..class_w[y as usize] as usize {
                rows.extend_from_slice(&z[2 * i..2 * i + 2]);
                dup_labels.push(y);
            }
        }
        let n = dup_labels.len();
        let reference = candle_nn::loss::cross_entropy(
            &Tensor::from_vec(rows, (n, 2), &dev).unwrap(),
            &Tensor::new(dup_labels.as_slice(), &dev).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!(
            (weighted_mean - reference).abs() < 1e-6,
            "{weighted_mean} vs {reference}"
        );
    }
}
