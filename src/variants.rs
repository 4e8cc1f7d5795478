//! Variant effects: how much a sequence change moves the model's call.
//!
//! For each VCF variant the genome window around it is scored with the reference allele and with
//! the alternate one (see [`crate::data::read_variant_windows`]); the effect is the change in the
//! class's probability and in its log-odds, the quantity in-silico mutagenesis (`explain`) reports
//! for every possible substitution. A SNP in a bound site that the model reads as destroying the
//! motif shows up as a large negative log-odds change.

use std::path::Path;

use anyhow::{anyhow, Result};
use indicatif::ProgressBar;

use crate::data::VariantWindows;
use crate::train::Predictor;

/// One variant's scores for the class followed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VariantEffect {
    pub ref_prob: f32,
    pub alt_prob: f32,
}

impl VariantEffect {
    /// ln(p / (1 - p)) of the alternate minus that of the reference, with probabilities kept
    /// 1e-7 away from 0 and 1 so a saturated call gives a large finite number.
    pub fn log_odds_change(&self) -> f64 {
        let log_odds = |p: f32| {
            let p = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
            (p / (1.0 - p)).ln()
        };
        log_odds(self.alt_prob) - log_odds(self.ref_prob)
    }
}

/// The reference and alternate probability of `class` for each variant, in input order; with
/// `both_strands` each window is also scored as its reverse complement and the two averaged.
pub fn score_variants(
    predictor: &Predictor,
    variants: &[VariantWindows],
    class: usize,
    both_strands: bool,
    progress: Option<&ProgressBar>,
) -> Result<Vec<VariantEffect>> {
    let sequences: Vec<&str> = variants
        .iter()
        .flat_map(|v| [v.ref_seq.as_str(), v.alt_seq.as_str()])
        .collect();
    let too_long = |i: usize| {
        let v = &variants[i / 2];
        anyhow!(
            "the window around {}:{} {}>{} is more than --max-length {} tokens; use a narrower \
             --window or a larger --max-length",
            v.chrom,
            v.pos,
            v.reference,
            v.alternate,
            predictor.max_len
        )
    };
    let probs =
        predictor.whole_sequence_probabilities(&sequences, both_strands, progress, too_long)?;
    let c = predictor.model.num_labels;
    Ok(probs
        .chunks(2 * c)
        .map(|pair| VariantEffect {
            ref_prob: pair[class],
            alt_prob: pair[c + class],
        })
        .collect())
}

/// Writes one tab-separated row per variant: its VCF fields, the window's start, the class's
/// probability with each allele, and the changes in probability and log-odds.
pub fn write_effects(
    path: &Path,
    variants: &[VariantWindows],
    effects: &[VariantEffect],
) -> Result<()> {
    crate::fsutil::write_atomic_with(path, |w| {
        use std::io::Write;
        writeln!(
            w,
            "chrom\tpos\tid\tref\talt\twindow_start\tref_prob\talt_prob\tprob_change\tlog_odds_change"
        )?;
        for (v, e) in variants.iter().zip(effects) {
            writeln!(
                w,
                "{}\t{}\t{}\t{}\t{}\t{}\t{:.6}\t{:.6}\t{:.6}\t{:.4}",
                v.chrom,
                v.pos,
                v.id,
                v.reference,
                v.alternate,
                v.window_start,
                e.ref_prob,
                e.alt_prob,
                e.alt_prob - e.ref_prob,
                e.log_odds_change()
            )?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_odds_change_is_the_logit_difference_and_stays_finite() {
        let e = VariantEffect {
            ref_prob: 0.8,
            alt_prob: 0.2,
        };
        assert!((e.log_odds_change() - 2.0 * (0.2f64 / 0.8).ln()).abs() < 1e-6);
        let saturated = VariantEffect {
            ref_prob: 1.0,
            alt_prob: 0.0,
        };
        let change = saturated.log_odds_change();
        assert!(change.is_finite() && change < -30.0, "{change}");
    }
}
