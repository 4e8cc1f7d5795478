//! Which bases drive a call, by two methods.
//!
//! In-silico mutagenesis (ISM): every base of a sequence is replaced by each of the other three,
//! the mutants are tokenized afresh (with BPE a substitution can change the tokens around it, as
//! a real variant would) and scored, and the change in the class's log-odds is that
//! substitution's effect. Exact for the model at hand and blind to its architecture, at the price
//! of 3L + 1 forward passes for a sequence of L bases. A base's importance is the mean drop over
//! its substitutions.
//!
//! Gradient times input: one forward and backward pass per batch. A token's score is the
//! gradient of the log-odds with respect to its embedding, dotted with the embedding (the
//! first-order estimate of what removing the token would change); each base gets an equal share
//! of the score of every token covering it. A fast first look; ISM is the measurement.
//!
//! Either way, the window of consecutive bases with the largest summed importance is the motif
//! the call points to.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var, D};

use crate::batch::collate;
use crate::data::Record;
use crate::eval::argmax;
use crate::fsutil::csv_field;
use crate::ops::ForwardCtx;
use crate::train::{encode_sequences, Predictor};

/// The bases substitutions are made to, in the order effects are reported.
pub const BASES: [u8; 4] = *b"ACGT";

/// The explanation of one sequence's call.
#[derive(Clone, Debug)]
pub struct Explanation {
    /// The class explained.
    pub class: usize,
    /// log(p / (1 - p)) of `class` for the sequence as it is.
    pub log_odds: f32,
    /// Per position, the change in log-odds when the base there becomes A, C, G or T (0 for
    /// the base already there); mutagenesis only.
    pub effects: Option<Vec<[f32; 4]>>,
    /// Per position: positive where the base supports the call, negative where it works against
    /// it. Mutagenesis: the mean drop in log-odds over the substitutions made there; gradient
    /// times input: the base's share of its tokens' scores.
    pub importance: Vec<f32>,
    /// The window of consecutive bases with the largest summed importance.
    pub motif: Motif,
}

/// A window of a sequence: bases `start..start + width` (0-based).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Motif {
    pub start: usize,
    pub width: usize,
    /// Summed importance of the window's bases.
    pub score: f32,
}

impl Motif {
    /// The window's bases in `seq`, the sequence it was found in (empty if it is not from `seq`).
    pub fn bases<'s>(&self, seq: &'s str) -> &'s str {
        seq.get(self.start..self.start + self.width)
            .unwrap_or_default()
    }
}

/// Every single-base substitution of `seq` as (position, new base), position by position, each
/// position's in ACGT order. A base outside ACGT (an N) is replaced by all four.
pub fn substitutions(seq: &[u8]) -> Vec<(usize, u8)> {
    seq.iter()
        .enumerate()
        .flat_map(|(pos, &here)| {
            BASES
                .iter()
                .filter(move |&&b| b != here.to_ascii_uppercase())
                .map(move |&b| (pos, b))
        })
        .collect()
}

/// log(p_c / (1 - p_c)) from a row of logits, in f64: logit_c minus the log-sum-exp of the other
/// classes, so confident calls keep their magnitude instead of rounding to infinity.
pub fn log_odds(logits: &[f32], class: usize) -> f32 {
    let others = logits
        .iter()
        .enumerate()
        .filter(|&(c, _)| c != class)
        .map(|(_, &l)| l as f64);
    let max = others.clone().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = others.map(|l| (l - max).exp()).sum();
    (logits[class] as f64 - (max + sum.ln())) as f32
}

/// The `width`-base window with the largest summed importance (the first of equal ones); the
/// whole sequence when it is shorter than `width` (an empty window for an empty sequence).
pub fn strongest_window(importance: &[f32], width: usize) -> Motif {
    let width = width.max(1).min(importance.len());
    let mut best = Motif {
        start: 0,
        width,
        score: importance
            .iter()
            .take(width)
            .map(|&v| v as f64)
            .sum::<f64>() as f32,
    };
    // Sums in f64 from scratch per window: exact enough and free of drift from a running sum.
    for start in 1..=importance.len().saturating_sub(width) {
        let score = importance[start..start + width]
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>() as f32;
        if score > best.score {
            best = Motif {
                start,
                width,
                score,
            };
        }
    }
    best
}

/// A k-mer over-represented in the motif windows, its two strands counted as one.
#[derive(Clone, Debug, PartialEq)]
pub struct EnrichedKmer {
    /// The alphabetically first of the k-mer and its reverse complement.
    pub kmer: String,
    /// Windows that contain it.
    pub windows: usize,
    /// Its occurrences in the windows and in the whole sequences.
    pub in_windows: usize,
    pub in_sequences: usize,
    /// Its share of the windows' k-mers over its share of the sequences' k-mers.
    pub enrichment: f64,
}

/// The k-mers the strongest windows share: every k-mer of ACGT (those with an N skipped), a k-mer
/// and its reverse complement counted as one (binding sites sit on either strand), with its
/// enrichment in the windows over the sequences they were cut from; those found in at least
/// `min_windows` windows, most enriched first.
pub fn enriched_kmers(
    windows: &[&str],
    sequences: &[&str],
    k: usize,
    min_windows: usize,
) -> Vec<EnrichedKmer> {
    use std::collections::{HashMap, HashSet};
    /// Canonical k-mers of `seq`.
    fn kmers(seq: &str, k: usize) -> impl Iterator<Item = String> + '_ {
        let upper = seq.to_ascii_uppercase();
        let n = upper.len();
        (0..(n + 1).saturating_sub(k)).filter_map(move |i| {
            let kmer = &upper[i..i + k];
            if !kmer.bytes().all(|b| BASES.contains(&b)) {
                return None;
            }
            let rc = crate::data::reverse_complement(kmer);
            Some(if rc.as_str() < kmer {
                rc
            } else {
                kmer.to_string()
            })
        })
    }
    if k == 0 {
        return Vec::new();
    }
    let mut background: HashMap<String, usize> = HashMap::new();
    let mut total_background = 0usize;
    for seq in sequences {
        for kmer in kmers(seq, k) {
            *background.entry(kmer).or_default() += 1;
            total_background += 1;
        }
    }
    let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
    let mut total_windows = 0usize;
    for window in windows {
        let mut seen = HashSet::new();
        for kmer in kmers(window, k) {
            let entry = counts.entry(kmer.clone()).or_default();
            entry.1 += 1;
            if seen.insert(kmer) {
                entry.0 += 1;
            }
            total_windows += 1;
        }
    }
    let mut out: Vec<EnrichedKmer> = counts
        .into_iter()
        .filter(|(_, (in_win, _))| *in_win >= min_windows.max(1))
        .map(|(kmer, (windows, in_windows))| {
            let in_sequences = background.get(&kmer).copied().unwrap_or(0).max(in_windows);
            let enrichment = (in_windows as f64 / total_windows as f64)
                / (in_sequences as f64 / total_background.max(1) as f64);
            EnrichedKmer {
                kmer,
                windows,
                in_windows,
                in_sequences,
                enrichment,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.enrichment
            .total_cmp(&a.enrichment)
            .then(b.windows.cmp(&a.windows))
            .then(a.kmer.cmp(&b.kmer))
    });
    out
}

/// Explains calls of one model with its tokenizer.
pub struct Explainer<'a> {
    pub predictor: Predictor<'a>,
    /// Width of the reported motif window, in bases.
    pub motif_width: usize,
}

impl Explainer<'_> {
    /// Fails unless `class` (when given) is one of the model's classes.
    fn check_class(&self, class: Option<usize>) -> Result<()> {
        let classes = self.predictor.model.num_labels;
        match class.filter(|&c| c >= classes) {
            Some(c) => bail!(
                "class {c} does not exist: the model has {classes} classes (0..={})",
                classes - 1
            ),
            None => Ok(()),
        }
    }

    /// Why a sequence longer than `max_len` tokens is refused: cut short, its tail would look
    /// as if no base there mattered.
    fn too_long(&self, seq: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "the sequence ({} bases) is more than --max-length {} tokens; the bases past it \
             would look as if they had no effect: raise --max-length",
            seq.len(),
            self.predictor.max_len
        )
    }

    /// Mutagenesis of `seq` for `class`, or for the class the model predicts for `seq`.
    pub fn mutagenesis(&self, seq: &str, class: Option<usize>) -> Result<Explanation> {
        use rayon::prelude::*;
        self.check_class(class)?;
        let classes = self.predictor.model.num_labels;
        let bases = seq.as_bytes();
        let subs = substitutions(bases);
        // Row 0 is the sequence itself, row 1 + k its k-th substitution.
        let mutants: Vec<String> = (0..=subs.len())
            .into_par_iter()
            .map(|row| {
                let mut s = bases.to_vec();
                if let Some(&(pos, base)) = row.checked_sub(1).map(|k| &subs[k]) {
                    s[pos] = base;
                }
                String::from_utf8(s).expect("ASCII bases stay ASCII")
            })
            .collect();
        let mutants: Vec<&str> = mutants.iter().map(String::as_str).collect();
        let max_len = self.predictor.max_len;
        let encoded = encode_sequences(&mutants, self.predictor.tokenizer, max_len, false);
        // A substitution can change how BPE splits the sequence; a mutant cut short would hide
        // the change at its tail.
        match encoded.truncated.first() {
            Some(0) => return Err(self.too_long(seq)),
            Some(&row) => {
                let (pos, base) = subs[row - 1];
                bail!(
                    "with {} at position {} the sequence is more than --max-length {max_len} \
                     tokens; raise --max-length",
                    base as char,
                    pos + 1
                );
            }
            None => {}
        }
        let variants = encoded.forward;
        let pad = self.predictor.tokenizer.special_tokens().pad;
        let logits = crate::train::predict(
            self.predictor.model,
            &variants,
            pad,
            self.predictor.batch_size,
            self.predictor.device,
            None,
            crate::train::Scores::Logits,
        )?;
        let row = |r: usize| &logits[r * classes..(r + 1) * classes];
        let class = class.unwrap_or_else(|| argmax(row(0)));
        let reference = log_odds(row(0), class);
        let mut effects = vec![[0f32; 4]; bases.len()];
        let mut drops = vec![(0f64, 0usize); bases.len()];
        for (k, &(pos, base)) in subs.iter().enumerate() {
            let delta = log_odds(row(k + 1), class) - reference;
            let slot = BASES
                .iter()
                .position(|&b| b == base)
                .expect("a base of ACGT");
            effects[pos][slot] = delta;
            drops[pos].0 -= delta as f64;
            drops[pos].1 += 1;
        }
        let importance: Vec<f32> = drops
            .iter()
            .map(|&(sum, n)| (sum / n.max(1) as f64) as f32)
            .collect();
        let motif = strongest_window(&importance, self.motif_width);
        Ok(Explanation {
            class,
            log_odds: reference,
            effects: Some(effects),
            importance,
            motif,
        })
    }

    /// Gradient-times-input explanations of `seqs` (one batch: one forward and one backward
    /// pass), each for `class` or for its predicted class.
    pub fn gradient_times_input(
        &self,
        seqs: &[&str],
        class: Option<usize>,
    ) -> Result<Vec<Explanation>> {
        self.check_class(class)?;
        let encoded = encode_sequences(
            seqs,
            self.predictor.tokenizer,
            self.predictor.max_len,
            false,
        );
        if let Some(&i) = encoded.truncated.first() {
            return Err(self
                .too_long(seqs[i])
                .context(format!("sequence {} of the batch", i + 1)));
        }
        let classes = self.predictor.model.num_labels;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let ids = encoded.forward;
        let order: Vec<usize> = (0..seqs.len()).collect();
        let batch = collate(&order, &ids, self.predictor.tokenizer.special_tokens().pad);
        let (ids_t, mask_t) = crate::train::batch_tensors(&batch, self.predictor.device)?;
        let (b, t) = (batch.batch_size, batch.seq_len);
        let table = self.predictor.model.word_embeddings();
        let probe = Var::zeros((b, t, table.dim(1)?), table.dtype(), self.predictor.device)?;
        let ctx = ForwardCtx::eval_with_embedding_probe(probe.as_tensor().clone());
        let logits = self.predictor.model.forward(&ids_t, &mask_t, &ctx)?;
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let chosen: Vec<usize> = rows
            .iter()
            .map(|r| class.unwrap_or_else(|| argmax(r)))
            .collect();
        // Sum over the batch of each row's log-odds: logit_c - logsumexp(other logits). Rows do
        // not interact in evaluation, so each row's gradient is its own.
        let mut pick = vec![0f32; b * classes];
        for (row, &c) in chosen.iter().enumerate() {
            pick[row * classes + c] = 1.0;
        }
        let pick = Tensor::from_vec(pick, (b, classes), self.predictor.device)?
            .to_dtype(logits.dtype())?;
        let own = (&logits * &pick)?.sum(1)?;
        let others = (&logits + (&pick * -1e9)?)?.log_sum_exp(D::Minus1)?;
        let grads = (own - others)?.sum_all()?.backward()?;
        let grad = grads
            .get(probe.as_tensor())
            .context("the word embeddings received no gradient")?;
        let embedded =
            table
                .index_select(&ids_t.flatten_all()?, 0)?
                .reshape((b, t, table.dim(1)?))?;
        let token_scores: Vec<Vec<f32>> =
            (grad * embedded)?.sum(2)?.to_dtype(DType::F32)?.to_vec2()?;
        seqs.iter()
            .enumerate()
            .map(|(row, seq)| {
                let importance = spread_over_bases(
                    &token_scores[row],
                    &self.predictor.tokenizer.token_spans(seq),
                    ids[row].len(),
                    seq.len(),
                );
                let motif = strongest_window(&importance, self.motif_width);
                Ok(Explanation {
                    class: chosen[row],
                    log_odds: log_odds(&rows[row], chosen[row]),
                    effects: None,
                    importance,
                    motif,
                })
            })
            .collect()
    }
}

/// Per-base importance from per-token scores: each base gets an equal share of the score of
/// every token covering it. `spans` are the tokens of the untruncated encoding (`None` for
/// special tokens); the model saw `kept` ids: the first `kept - 1` of them and `[SEP]`, so
/// tokens past that (cut by `--max-length`) contribute nothing.
fn spread_over_bases(
    scores: &[f32],
    spans: &[Option<(usize, usize)>],
    kept: usize,
    len: usize,
) -> Vec<f32> {
    let mut importance = vec![0f64; len];
    for (&score, span) in scores.iter().zip(spans).take(kept.saturating_sub(1)) {
        if let Some((start, end)) = *span {
            let share = score as f64 / (end - start) as f64;
            importance[start..end].iter_mut().for_each(|v| *v += share);
        }
    }
    importance.into_iter().map(|v| v as f32).collect()
}

/// Writes `explained` (records with their explanations, in input order) as two CSV files in
/// `dir`: `effects.csv`, a row per base (1-based position, the base, with mutagenesis the change
/// in log-odds for each substitution, its importance), and `motifs.csv`, a row per sequence (the
/// class, its log-odds, the strongest window as 1-based inclusive positions and its bases). Both
/// atomic.
pub fn write_explanations(dir: &Path, explained: &[(&Record, Explanation)]) -> Result<()> {
    use std::io::Write;
    let with_effects = explained.iter().all(|(_, e)| e.effects.is_some());
    crate::fsutil::write_atomic_with(&dir.join("effects.csv"), |w| {
        let deltas = if with_effects {
            ",delta_A,delta_C,delta_G,delta_T"
        } else {
            ""
        };
        writeln!(w, "id,position,base{deltas},importance")?;
        for (record, e) in explained {
            let id = csv_field(&record.id);
            for (pos, (base, imp)) in record.seq.chars().zip(&e.importance).enumerate() {
                write!(w, "{id},{},{base}", pos + 1)?;
                if let Some(effects) = e.effects.as_ref().filter(|_| with_effects) {
                    for d in effects[pos] {
                        write!(w, ",{d:.5}")?;
                    }
                }
                writeln!(w, ",{imp:.5}")?;
            }
        }
        Ok(())
    })?;
    crate::fsutil::write_atomic_with(&dir.join("motifs.csv"), |w| {
        writeln!(
            w,
            "id,length,class,log_odds,motif_start,motif_end,motif,motif_importance"
        )?;
        for (record, e) in explained {
            let m = e.motif;
            let bases = m.bases(&record.seq);
            writeln!(
                w,
                "{},{},{},{:.5},{},{},{bases},{:.5}",
                csv_field(&record.id),
                record.seq.len(),
                e.class,
                e.log_odds,
                m.start + 1,
                m.start + m.width,
                m.score
            )?;
        }
        Ok(())
    })
}

/// Writes `kmers` as `dir/kmers.csv` (atomic), in their order.
pub fn write_kmers(dir: &Path, kmers: &[EnrichedKmer]) -> Result<()> {
    use std::io::Write;
    crate::fsutil::write_atomic_with(&dir.join("kmers.csv"), |w| {
        writeln!(w, "kmer,windows,in_windows,in_sequences,enrichment")?;
        for k in kmers {
            writeln!(
                w,
                "{},{},{},{},{:.4}",
                k.kmer, k.windows, k.in_windows, k.in_sequences, k.enrichment
            )?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutions_cover_every_other_base_once() {
        let subs = substitutions(b"ACgN");
        let at = |p: usize| -> Vec<u8> { subs.iter().filter(|s| s.0 == p).map(|s| s.1).collect() };
        assert_eq!(at(0), b"CGT");
        assert_eq!(at(1), b"AGT");
        assert_eq!(at(2), b"ACT", "lower-case g is the base G");
        assert_eq!(at(3), b"ACGT", "N is replaced by all four");
        assert_eq!(subs.len(), 3 * 3 + 4);
        // Position-major order, as the explainer's rows assume.
        assert!(subs.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn log_odds_matches_the_probability_definition() {
        for logits in [
            vec![0.3f32, -1.2],
            vec![2.0, 0.5, -0.7],
            vec![0.0, 0.0, 0.0, 1.0],
        ] {
            let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
            for c in 0..logits.len() {
                let p = (logits[c] as f64).exp() / z;
                let want = (p / (1.0 - p)).ln();
                assert!((log_odds(&logits, c) as f64 - want).abs() < 1e-6);
            }
        }
        // Far beyond where 1 - p rounds to zero in f32 the log-odds stay finite and exact.
        assert!((log_odds(&[60.0, 0.0], 0) - 60.0).abs() < 1e-4);
        assert!((log_odds(&[60.0, 0.0], 1) + 60.0).abs() < 1e-4);
    }

    #[test]
    fn enriched_kmers_count_both_strands_as_one_and_skip_n() {
        // 3-mers of AACGT: AAC (= GTT), ACG, CGT (= ACG): AAC 1, ACG 2 of 3. The window ACGT
        // holds ACG twice (once as CGT): 2 of 2, so ACG is enriched (2/2) / (2/3) = 1.5.
        let got = enriched_kmers(&["ACGT"], &["AACGT", "ACNGT"], 3, 1);
        assert_eq!(
            got,
            vec![EnrichedKmer {
                kmer: "ACG".into(),
                windows: 1,
                in_windows: 2,
                in_sequences: 2,
                enrichment: 1.5,
            }]
        );
        // A k-mer must be in `min_windows` windows; the most enriched comes first.
        let windows = ["GGGATT", "CCGATT", "AATCTT"];
        let seqs = ["GGGATTCCCCCC", "CCGATTCCCCCC", "AATCTTCCCCCC"];
        let got = enriched_kmers(&windows, &seqs, 4, 3);
        assert_eq!(got.len(), 1, "{got:?}");
        // GATT in every window (AATC is its reverse complement).
        assert_eq!((got[0].kmer.as_str(), got[0].windows), ("AATC", 3));
        assert!(enriched_kmers(&windows, &seqs, 4, 4).is_empty());
    }

    #[test]
    fn strongest_window_equals_brute_force() {
        let mut init = crate::ops::Initializer::new(3);
        for (len, width) in [(50usize, 7usize), (12, 12), (5, 9), (1, 1), (30, 1)] {
            let imp = init.normal(len, 1.0);
            let got = strongest_window(&imp, width);
            let w = width.min(len);
            let sums: Vec<f64> = (0..=len - w)
                .map(|s| imp[s..s + w].iter().map(|&v| v as f64).sum())
                .collect();
            let best = sums
                .iter()
                .enumerate()
                .fold(0, |b, (i, &v)| if v > sums[b] { i } else { b });
            assert_eq!(
                (got.start, got.width),
                (best, w),
                "len {len}, width {width}"
            );
            assert!((got.score as f64 - sums[best]).abs() < 1e-5);
        }
        let empty = strongest_window(&[], 4);
        assert_eq!((empty.start, empty.width, empty.score), (0, 0, 0.0));
    }
}
