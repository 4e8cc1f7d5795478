//! The fine-tuning loop: data to batches, forward and backward, AdamW steps with warm-up, gradient
//! accumulation and clipping, evaluation on dev with best-checkpoint keeping and early stopping,
//! atomic checkpoints that `--resume` continues exactly, and the final test evaluation.

pub mod bench;
pub mod config;
pub mod loss;
pub mod optim;
mod repeat;
mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::batch::{collate, plan_batches, Batch, BatchOrder};
use crate::data::{self, Record};
use crate::eval::{self, LogEntry, Metrics};
use crate::model::params::{ParamStore, Trainable};
use crate::model::{self, LoadOptions, LoadedModel, SequenceClassifier};
use crate::ops::ForwardCtx;
use crate::peft::{adapter, LoraConfig};
use crate::tokenize::{load_tokenizer, Tokenizer};
use config::{Method, SplitKind, TrainConfig};
use optim::{check_loss_is_finite, clip_grad_norm, learning_rate, AdamW};
pub use repeat::{mean_sd, run_folds, run_seeds, FoldsSummary, MetricSpread};
pub(crate) use state::replace_dir;
use state::RunState;

/// Token ids of every record, truncated to `max_len`; records are encoded in parallel.
pub fn encode_all(records: &[Record], tokenizer: &dyn Tokenizer, max_len: usize) -> Vec<Vec<u32>> {
    use rayon::prelude::*;
    records
        .par_iter()
        .map(|r| tokenizer.encode(&r.seq, Some(max_len)))
        .collect()
}

/// Token ids of sequences on one or both strands, and which were cut short.
pub struct Encoded {
    pub forward: Vec<Vec<u32>>,
    /// The reverse complements' ids in the same order, when both strands are scored: what
    /// [`predict_strands`] and [`evaluate`] take.
    pub reverse: Option<Vec<Vec<u32>>>,
    /// Indices of the sequences longer than `max_len` tokens on either strand, in order.
    pub truncated: Vec<usize>,
    /// Indices of the sequences that give no token at all (shorter than a k-mer tokenizer's k):
    /// the model sees only its special tokens for them.
    pub without_tokens: Vec<usize>,
}

/// The records' ids cut at `max_len` tokens (see [`Encoded`]).
pub fn encode_strands(
    records: &[Record],
    tokenizer: &dyn Tokenizer,
    max_len: usize,
    both_strands: bool,
) -> Encoded {
    let sequences: Vec<&str> = records.iter().map(|r| r.seq.as_str()).collect();
    encode_sequences(&sequences, tokenizer, max_len, both_strands)
}

/// Says on stderr how many of `records` were cut at `max_len` tokens ([`Encoded::truncated`]:
/// their tails do not reach the model) and how many gave no token at all
/// ([`Encoded::without_tokens`]: their calls say nothing about them), which a user should know
/// before trusting the calls.
pub fn warn_about_encoding(records: &[Record], encoded: &Encoded, max_len: usize, what: &str) {
    if let Some(&first) = encoded.truncated.first() {
        eprintln!(
            "warning: {} of {} {what} sequences are longer than max length {max_len} tokens and \
             were cut short (the first: `{}`); raise --max-length to keep their tails",
            encoded.truncated.len(),
            records.len(),
            records[first].id
        );
    }
    if let Some(&first) = encoded.without_tokens.first() {
        eprintln!(
            "warning: {} of {} {what} sequences are too short to give the tokenizer a single \
             token (the first: `{}`, {} bp), so the model sees none of their bases",
            encoded.without_tokens.len(),
            records.len(),
            records[first].id,
            records[first].seq.len()
        );
    }
}

/// Labels are class indices, so labels 0 and 2 make three classes; a class with no training
/// sequence (a gap in the labels, or one only dev or test has) is never learnt and changes the
/// metrics (MCC over three classes, not two). Says so on stderr.
fn warn_untrained_classes(train_labels: &[usize], num_labels: usize) {
    let missing = classes_without_sequences(train_labels, num_labels);
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(usize::to_string).collect();
        eprintln!(
            "warning: no training sequence has label {}; labels are class indices, so the model \
             has {num_labels} classes (0..={}) and never learns {}; renumber the labels \
             0..=K-1 if that is not meant",
            names.join(", "),
            num_labels - 1,
            if missing.len() == 1 {
                "that one"
            } else {
                "those"
            }
        );
    }
}

/// The classes below `num_labels` that none of `labels` has.
fn classes_without_sequences(labels: &[usize], num_labels: usize) -> Vec<usize> {
    let mut seen = vec![false; num_labels];
    for &y in labels {
        seen[y] = true;
    }
    (0..num_labels).filter(|&c| !seen[c]).collect()
}

/// [`Encoded`] `sequences`, in parallel.
pub(crate) fn encode_sequences(
    sequences: &[&str],
    tokenizer: &dyn Tokenizer,
    max_len: usize,
    both_strands: bool,
) -> Encoded {
    use rayon::prelude::*;
    // One token over the limit tells a sequence that will be cut; only those are encoded again.
    let encode = |s: &str| {
        let ids = tokenizer.encode(s, Some(max_len.saturating_add(1)));
        if ids.len() > max_len {
            (tokenizer.encode(s, Some(max_len)), true)
        } else {
            (ids, false)
        }
    };
    let (forward, mut cut): (Vec<_>, Vec<bool>) = sequences.par_iter().map(|s| encode(s)).unzip();
    let reverse = both_strands.then(|| {
        let (ids, reverse_cut): (Vec<_>, Vec<bool>) = sequences
            .par_iter()
            .map(|s| encode(&data::reverse_complement(s)))
            .unzip();
        cut.iter_mut().zip(reverse_cut).for_each(|(c, r)| *c |= r);
        ids
    });
    let truncated = cut
        .iter()
        .enumerate()
        .filter(|(_, &c)| c)
        .map(|(i, _)| i)
        .collect();
    // The empty sequence's ids are the special tokens alone.
    let bare = tokenizer.encode("", Some(max_len));
    let without_tokens = forward
        .iter()
        .enumerate()
        .filter(|(_, ids)| **ids == bare)
        .map(|(i, _)| i)
        .collect();
    Encoded {
        forward,
        reverse,
        truncated,
        without_tokens,
    }
}

/// The (batch, seq) id and mask tensors of a collated batch.
pub fn batch_tensors(batch: &Batch, device: &Device) -> Result<(Tensor, Tensor)> {
    let shape = (batch.batch_size, batch.seq_len);
    let ids = Tensor::from_vec(batch.input_ids.clone(), shape, device)?;
    let mask = Tensor::from_vec(batch.attention_mask.clone(), shape, device)?;
    Ok((ids, mask))
}

/// What [`predict`] returns per sequence and class.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scores {
    Probabilities,
    /// Raw logits: what log-odds are computed from without the rounding of probabilities near 0
    /// or 1.
    Logits,
}

/// Class scores (row-major N x C) for `sequences`, in their order. Batches are formed from
/// length-sorted sequences so little compute goes to padding.
pub fn predict(
    model: &SequenceClassifier,
    sequences: &[Vec<u32>],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
    progress: Option<&ProgressBar>,
    scores: Scores,
) -> Result<Vec<f32>> {
    let c = model.num_labels;
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| sequences[i].len());
    let mut out = vec![0f32; sequences.len() * c];
    let ctx = ForwardCtx::eval();
    for chunk in order.chunks(batch_size) {
        let batch = collate(chunk, sequences, pad_id);
        let (ids, mask) = batch_tensors(&batch, device)?;
        let logits = model.forward(&ids, &mask, &ctx)?.detach();
        let rows: Vec<Vec<f32>> = match scores {
            Scores::Probabilities => crate::ops::softmax_last(&logits)?.to_vec2()?,
            Scores::Logits => logits.to_dtype(DType::F32)?.to_vec2()?,
        };
        for (row, &i) in rows.iter().zip(chunk) {
            out[i * c..(i + 1) * c].copy_from_slice(row);
        }
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    Ok(out)
}

/// Class probabilities (row-major N x C) of `forward`; with `reverse` (the ids of the same
/// sequences' reverse complements, in the same order) the mean of both strands' probabilities, so
/// a call does not depend on which strand a sequence was written on.
pub fn predict_strands(
    model: &SequenceClassifier,
    forward: &[Vec<u32>],
    reverse: Option<&[Vec<u32>]>,
    pad_id: u32,
    batch_size: usize,
    device: &Device,
    progress: Option<&ProgressBar>,
) -> Result<Vec<f32>> {
    let scores = Scores::Probabilities;
    let mut probs = predict(model, forward, pad_id, batch_size, device, progress, scores)?;
    if let Some(reverse) = reverse {
        anyhow::ensure!(
            reverse.len() == forward.len(),
            "{} reverse-strand sequences for {} forward ones",
            reverse.len(),
            forward.len()
        );
        let other = predict(model, reverse, pad_id, batch_size, device, progress, scores)?;
        for (p, q) in probs.iter_mut().zip(other) {
            *p = 0.5 * (*p + q);
        }
    }
    // NaN probabilities would pass for a confident call of class 0 in every metric and file.
    if let Some(i) = probs.iter().position(|p| !p.is_finite()) {
        bail!(
            "the model's class probabilities are NaN or infinite (first for sequence {} of {}): \
             its weights have diverged or overflow on this input",
            i / model.num_labels + 1,
            forward.len()
        );
    }
    Ok(probs)
}

/// A model with its tokenizer and batching: what scoring raw sequences needs (`explain`, `scan`,
/// `variants`).
pub struct Predictor<'a> {
    pub model: &'a SequenceClassifier,
    pub tokenizer: &'a dyn Tokenizer,
    /// Most tokens a sequence may have.
    pub max_len: usize,
    pub batch_size: usize,
    pub device: &'a Device,
}

impl Predictor<'_> {
    /// Class probabilities (row-major N x C) of `sequences`, averaged over both strands with
    /// `both_strands`. None is cut short: a sequence longer than `max_len` tokens on either
    /// strand (BPE may split the reverse complement into more tokens) is the error `too_long`
    /// makes of its index, so the caller can name it.
    pub fn whole_sequence_probabilities(
        &self,
        sequences: &[&str],
        both_strands: bool,
        progress: Option<&ProgressBar>,
        too_long: impl Fn(usize) -> anyhow::Error,
    ) -> Result<Vec<f32>> {
        let encoded = encode_sequences(sequences, self.tokenizer, self.max_len, both_strands);
        if let Some(&i) = encoded.truncated.first() {
            return Err(too_long(i));
        }
        predict_strands(
            self.model,
            &encoded.forward,
            encoded.reverse.as_deref(),
            self.tokenizer.special_tokens().pad,
            self.batch_size,
            self.device,
            progress,
        )
    }
}

/// Metrics (with mean cross-entropy as `loss`) of `model` on labelled sequences, scored on one
/// strand or, with `reverse`, averaged over both (see [`predict_strands`]).
pub fn evaluate(
    model: &SequenceClassifier,
    sequences: &[Vec<u32>],
    reverse: Option<&[Vec<u32>]>,
    labels: &[usize],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<(Metrics, Vec<f32>)> {
    let probs = predict_strands(model, sequences, reverse, pad_id, batch_size, device, None)?;
    Ok((scored_metrics(labels, &probs, model.num_labels), probs))
}

/// Metrics of class probabilities (row-major N x `classes`) against `labels`, with their mean
/// cross-entropy as `loss`.
pub fn scored_metrics(labels: &[usize], probs: &[f32], classes: usize) -> Metrics {
    let mut metrics = eval::compute_metrics(labels, probs, classes);
    let loss: f64 = labels
        .iter()
        .enumerate()
        .map(|(i, &y)| -(probs[i * classes + y].max(1e-12) as f64).ln())
        .sum::<f64>()
        / labels.len().max(1) as f64;
    metrics.loss = Some(loss);
    metrics
}

/// A split's records, ids and labels; `reverse`: the ids of the reverse complements, when the
/// split is scored on both strands.
struct SplitData {
    records: Vec<Record>,
    ids: Vec<Vec<u32>>,
    reverse: Option<Vec<Vec<u32>>>,
    labels: Vec<usize>,
}

fn prepare_split(
    records: Vec<Record>,
    tokenizer: &dyn Tokenizer,
    max_len: usize,
    both_strands: bool,
    what: &str,
) -> Result<SplitData> {
    let labels = records
        .iter()
        .map(|r| {
            r.label
                .with_context(|| format!("{what} record `{}` has no label", r.id))
        })
        .collect::<Result<Vec<_>>>()?;
    let encoded = encode_strands(&records, tokenizer, max_len, both_strands);
    warn_about_encoding(&records, &encoded, max_len, what);
    Ok(SplitData {
        records,
        ids: encoded.forward,
        reverse: encoded.reverse,
        labels,
    })
}

/// The LoRA configuration a run asks for; empty targets mean the architecture's default, which
/// [`model::load_classifier`] fills in.
pub fn lora_config(cfg: &TrainConfig) -> LoraConfig {
    LoraConfig {
        r: cfg.lora.r,
        alpha: cfg.lora.alpha,
        dropout: cfg.lora.dropout,
        target_modules: cfg.lora.target_modules.clone(),
    }
}

/// What a finished run reports.
pub struct RunSummary {
    pub dev_best: Metrics,
    pub test: Metrics,
    pub best_step: usize,
    pub steps: usize,
    pub run_dir: PathBuf,
}

/// Trains as `cfg` says, or continues the run in `cfg.out` when `resume` is set.
pub fn run(cfg: &TrainConfig, resume: bool) -> Result<RunSummary> {
    cfg.validate()?;
    let run_dir = cfg.out.clone();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let device = crate::device::parse_device(&cfg.device)?;
    crate::device::seed_generator(&device, cfg.seed)?;

    // Data.
    let read_opts = data::ReadOptions {
        sequence_column: cfg.sequence_column.clone(),
        label_column: cfg.label_column.clone(),
        skip_invalid: cfg.skip_invalid,
        ambiguous_as_n: cfg.ambiguous_as_n,
        labels: data::LabelPolicy::Required,
    };
    let split_cfg = data::SplitConfig {
        strategy: match cfg.split.strategy {
            SplitKind::Random => data::SplitStrategy::Random,
            SplitKind::Stratified => data::SplitStrategy::Stratified,
            SplitKind::Chromosome => data::SplitStrategy::Chromosome,
            SplitKind::Similarity => data::SplitStrategy::Similarity,
        },
        dev_fraction: cfg.split.dev_fraction,
        test_fraction: cfg.split.test_fraction,
        seed: cfg.seed,
        dev_chroms: cfg.split.dev_chroms.clone(),
        test_chroms: cfg.split.test_chroms.clone(),
        kmer: cfg.split.kmer,
        fold: cfg.split.fold.checked_sub(1).map(|index| data::Fold {
            index,
            count: cfg.split.folds,
        }),
    };
    let (mut splits, source, skipped) = data::load_splits(&cfg.data, &read_opts, &split_cfg)?;
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    if skipped > 0 {
        println!(
            "skipped {skipped} sequences with letters other than ACGTN in {} (--skip-invalid)",
            cfg.data.display()
        );
    }
    if matches!(source, data::SplitSource::SplitFromFile) {
        data::write_split_csv(&run_dir.join("split.csv"), &splits)?;
        let fold = match cfg.split.fold {
            0 => String::new(),
            k => format!(", test: fold {k} of {}", cfg.split.folds),
        };
        println!(
            "split {} into train {} / dev {} / test {} ({:?}{fold}, seed {}); saved to {}",
            cfg.data.display(),
            splits.train.len(),
            splits.dev.len(),
            splits.test.len(),
            cfg.split.strategy,
            cfg.seed,
            run_dir.join("split.csv").display()
        );
    }
    if let Some(n) = cfg.max_train_samples.filter(|&n| n < splits.train.len()) {
        let mut idx: Vec<usize> = (0..splits.train.len()).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(cfg.seed));
        let mut keep = idx[..n].to_vec();
        keep.sort_unstable();
        splits.train = keep.into_iter().map(|i| splits.train[i].clone()).collect();
    }
    let overlap = data::similarity::SplitOverlap::of(&splits, cfg.split.kmer);
    match &overlap {
        Some(o) => println!(
            "overlap: {} of {} dev and {} of {} test sequences share a {}-mer (either strand) \
             with a training sequence{}",
            o.dev_sharing,
            o.dev,
            o.test_sharing,
            o.test,
            o.kmer,
            if o.dev_sharing + o.test_sharing > 0
                && matches!(source, data::SplitSource::SplitFromFile)
            {
                " (--split similarity keeps such sequences in one split)"
            } else {
                ""
            }
        ),
        None => println!(
            "overlap: not checked, the training set has over {} M bases",
            data::similarity::MAX_OVERLAP_BASES / 1_000_000
        ),
    }
    if cfg.reverse_complement {
        splits.train = data::with_reverse_complements(&splits.train);
    }
    let tokenizer = load_tokenizer(&cfg.model)?;
    let pad = tokenizer.special_tokens().pad;
    let (max_len, both) = (cfg.max_length, cfg.average_strands);
    let train = prepare_split(splits.train, tokenizer.as_ref(), max_len, false, "train")?;
    let dev = prepare_split(splits.dev, tokenizer.as_ref(), max_len, both, "dev")?;
    let test = prepare_split(splits.test, tokenizer.as_ref(), max_len, both, "test")?;
    let num_labels = train
        .labels
        .iter()
        .chain(&dev.labels)
        .chain(&test.labels)
        .max()
        .map_or(2, |m| (m + 1).max(2));
    warn_untrained_classes(&train.labels, num_labels);
    let mean_tokens =
        train.ids.iter().map(Vec::len).sum::<usize>() as f64 / train.ids.len().max(1) as f64;
    println!(
        "data: train {} / dev {} / test {} sequences, {} classes; tokenizer {}, {:.1} tokens per sequence",
        train.ids.len(),
        dev.ids.len(),
        test.ids.len(),
        num_labels,
        tokenizer.describe(),
        mean_tokens
    );
    let class_weights = loss::class_weights(cfg.class_weights.as_ref(), &train.labels, num_labels)?;
    if cfg.class_weights.is_some() {
        let shown: Vec<String> = class_weights.iter().map(|w| format!("{w:.3}")).collect();
        println!("class weights in the loss: {}", shown.join(", "));
    }
    if cfg.average_strands {
        println!("dev and test: class probabilities averaged over both strands");
    }

    // Model.
    let lora = match cfg.method {
        Method::Full => None,
        Method::Lora | Method::QloraInt8 | Method::QloraNf4 => {
            let from_adapter = match &cfg.adapter {
                Some(dir) => Some(adapter::load_adapter(dir, &device)?),
                None => None,
            };
            Some(match &from_adapter {
                Some(a) => a.config.clone(),
                None => lora_config(cfg),
            })
        }
    };
    let start_adapter = match &cfg.adapter {
        Some(dir) => Some(adapter::load_adapter(dir, &device)?.tensors),
        None => None,
    };
    let opts = LoadOptions {
        num_labels: Some(num_labels),
        trainable: match cfg.method {
            Method::Full => Trainable::All,
            Method::Lora | Method::QloraInt8 | Method::QloraNf4 => Trainable::AdaptersAndHead,
        },
        lora: lora.clone(),
        pooling: cfg.pooling,
        seed: cfg.seed,
        hidden_dropout: cfg.hidden_dropout,
        attention_dropout: cfg.attention_dropout,
        quantize: cfg.method.quantize(),
        precision: cfg.precision,
    };
    let LoadedModel {
        model,
        params,
        config: model_cfg,
        notes,
        lora,
        ..
    } = model::load_classifier(&cfg.model, start_adapter, &opts, &device)?;
    for note in &notes {
        println!("model: {note}");
    }
    let head_dir = cfg.adapter.as_deref().unwrap_or(&cfg.model);
    if let Some(record) = model::record::read_record(head_dir)? {
        if record.pooling != cfg.pooling {
            eprintln!(
                "warning: the head in {} was trained on {} pooling and now trains on {}",
                head_dir.display(),
                record.pooling.name(),
                cfg.pooling.name()
            );
        }
    }
    let (total, trainable) = (params.num_params(), params.num_trainable());
    println!(
        "parameters: {} total, {} trainable ({:.2} %), method {}, weights {:.1} MiB",
        total,
        trainable,
        100.0 * trainable as f64 / total as f64,
        cfg.method.name(),
        params.weight_bytes() as f64 / (1 << 20) as f64
    );

    let mut opt = AdamW::new(
        params.trainable(),
        cfg.beta1,
        cfg.beta2,
        cfg.eps,
        cfg.weight_decay,
    )?;
    let lengths: Vec<usize> = train.ids.iter().map(Vec::len).collect();
    let micro_per_epoch = train.ids.len().div_ceil(cfg.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(cfg.grad_accum);
    let planned = if cfg.epochs == 0 {
        usize::MAX
    } else {
        cfg.epochs * steps_per_epoch
    };
    let total_steps = if cfg.max_steps > 0 {
        cfg.max_steps.min(planned)
    } else {
        planned
    };
    let warmup = cfg
        .warmup_steps
        .unwrap_or((cfg.warmup_ratio * total_steps as f64).round() as usize);
    let peak_lr = cfg.learning_rate();
    let best_dir = run_dir.join("best");
    let saver = BestSaver {
        cfg,
        lora: lora.as_ref(),
        model_cfg: &model_cfg,
        tokenizer: tokenizer.as_ref(),
    };

    let mut state = if resume {
        let st = state::load_checkpoint(&run_dir, &params, &mut opt)?
            .with_context(|| format!("{} holds no checkpoint to resume from", run_dir.display()))?;
        println!(
            "resuming {} at step {} (epoch {})",
            run_dir.display(),
            st.step,
            st.epoch
        );
        st
    } else {
        crate::fsutil::write_atomic(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        RunState::default()
    };

    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(state.step as u64);
    let mut window = (0f64, 0usize, 0usize, Instant::now()); // loss sum, micro count, seqs, start
    let mut stop = state.finished;
    while !stop && state.step < total_steps && (cfg.epochs == 0 || state.epoch < cfg.epochs) {
        let plan = plan_batches(
            &lengths,
            cfg.batch_size,
            BatchOrder::Shuffled {
                seed: cfg.seed,
                epoch: state.epoch as u64,
                bucket_by_length: cfg.bucket_by_length,
            },
        );
        while state.micro_in_epoch < plan.len() && state.step < total_steps {
            let group_end = (state.micro_in_epoch + cfg.grad_accum).min(plan.len());
            let group = &plan[state.micro_in_epoch..group_end];
            let group_weight: f64 = group
                .iter()
                .flatten()
                .map(|&i| class_weights[train.labels[i]])
                .sum();
            let mut grads: HashMap<String, Tensor> = HashMap::new();
            for (m, micro) in group.iter().enumerate() {
                let batch = collate(micro, &train.ids, pad);
                let (ids, mask) = batch_tensors(&batch, &device)?;
                let labels: Vec<u32> = micro.iter().map(|&i| train.labels[i] as u32).collect();
                let weights: Vec<f32> = labels
                    .iter()
                    .map(|&y| class_weights[y as usize] as f32)
                    .collect();
                let micro_weight: f64 = weights.iter().map(|&w| w as f64).sum();
                let labels = Tensor::from_vec(labels, micro.len(), &device)?;
                let weights = Tensor::from_vec(weights, micro.len(), &device)?;
                let ctx = ForwardCtx::train(mix_seed(cfg.seed, state.step, m));
                let logits = model.forward(&ids, &mask, &ctx)?;
                // The group's weighted mean loss is the sum over its micro-batches of these.
                let nll_sum = loss::weighted_nll_sum(&logits, &labels, &weights)?;
                let store = (&nll_sum / group_weight)?.backward()?;
                for (name, g) in params.gradients(&store) {
                    let sum = match grads.remove(&name) {
                        Some(acc) => (acc + g)?,
                        None => g,
                    };
                    grads.insert(name, sum);
                }
                let micro_loss = nll_sum.to_dtype(DType::F64)?.to_scalar::<f64>()? / micro_weight;
                check_loss_is_finite(micro_loss, state.step + 1, peak_lr)?;
                window.0 += micro_loss;
                window.1 += 1;
                window.2 += micro.len();
            }
            if cfg.max_grad_norm > 0.0 {
                clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
            }
            let lr = learning_rate(cfg.scheduler, peak_lr, state.step, warmup, total_steps);
            opt.step(&grads, lr)?;
            state.step += 1;
            state.micro_in_epoch = group_end;
            bar.inc(1);
            let epoch_f = state.epoch as f64 + state.micro_in_epoch as f64 / plan.len() as f64;
            if state.step % cfg.log_every.max(1) == 0 || state.step == total_steps {
                let secs = window.3.elapsed().as_secs_f64().max(1e-9);
                let entry = LogEntry::Train {
                    step: state.step,
                    epoch: epoch_f,
                    loss: window.0 / window.1.max(1) as f64,
                    lr,
                    seq_per_s: window.2 as f64 / secs,
                };
                if let LogEntry::Train {
                    loss, seq_per_s, ..
                } = &entry
                {
                    bar.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {seq_per_s:.1} seq/s"));
                }
                state.log.push(entry);
                write_log(&run_dir, &state.log)?;
                window = (0.0, 0, 0, Instant::now());
            }
            let epoch_done = state.micro_in_epoch >= plan.len();
            if epoch_done {
                state.epoch += 1;
                state.micro_in_epoch = 0;
            }
            let periodic = cfg.eval_every > 0 && state.step % cfg.eval_every == 0;
            if epoch_done || periodic || state.step == total_steps {
                let (metrics, _) = evaluate(
                    &model,
                    &dev.ids,
                    dev.reverse.as_deref(),
                    &dev.labels,
                    pad,
                    cfg.eval_batch_size,
                    &device,
                )
                .with_context(|| format!("evaluating on dev after step {}", state.step))?;
                let value = metrics.get(&cfg.metric).unwrap_or(f64::NAN);
                let improved = match state.best_value {
                    None => true,
                    Some(best) if Metrics::higher_is_better(&cfg.metric) => value > best,
                    Some(best) => value < best,
                };
                say(
                    &bar,
                    format!(
                    "step {:>6}  epoch {:>5.2}  dev {} {:.4}  accuracy {:.4}  f1 {:.4}  auroc {}{}",
                    state.step,
                    epoch_f,
                    cfg.metric,
                    value,
                    metrics.accuracy,
                    metrics.f1,
                    metrics.auroc.map_or("-".into(), |v| format!("{v:.4}")),
                    if improved { "  (best)" } else { "" }
                ),
                );
                state.log.push(LogEntry::Eval {
                    step: state.step,
                    epoch: epoch_f,
                    split: "dev".into(),
                    metrics: metrics.clone(),
                });
                if improved {
                    state.best_value = Some(value);
                    state.best_step = state.step;
                    state.best_metrics = Some(metrics);
                    state.evals_since_best = 0;
                    saver.save(&best_dir, &params)?;
                } else {
                    state.evals_since_best += 1;
                }
                if cfg.patience > 0 && state.evals_since_best >= cfg.patience {
                    say(
                        &bar,
                        format!(
                            "early stopping: no {} improvement in {} evaluations",
                            cfg.metric, cfg.patience
                        ),
                    );
                    stop = true;
                }
                state.finished = stop || state.step >= total_steps;
                write_log(&run_dir, &state.log)?;
                state::save_checkpoint(&run_dir, &state, &params, &opt)?;
                if stop {
                    break;
                }
            }
        }
    }
    bar.finish_and_clear();

    // Test with the best checkpoint.
    let dev_best = state
        .best_metrics
        .clone()
        .context("training ended without any evaluation")?;
    restore_best(&best_dir, cfg.method, &params, &device)?;
    let (test_metrics, test_probs) = evaluate(
        &model,
        &test.ids,
        test.reverse.as_deref(),
        &test.labels,
        pad,
        cfg.eval_batch_size,
        &device,
    )?;
    let test_intervals = eval::test_intervals(&test.labels, &test_probs, num_labels)?;
    state.log.push(LogEntry::Eval {
        step: state.best_step,
        epoch: state.epoch as f64,
        split: "test".into(),
        metrics: test_metrics.clone(),
    });
    write_log(&run_dir, &state.log)?;
    write_predictions(
        &run_dir.join("test_predictions.csv"),
        &test.records,
        &test_probs,
        num_labels,
        true,
    )?;
    let config_toml = cfg.to_toml()?;
    eval::write_report(
        &run_dir.join("report.html"),
        &eval::ReportInput {
            title: &format!("dnatune run {}", run_dir.display()),
            config_toml: &config_toml,
            log: &state.log,
            best_metric: &cfg.metric,
            test: Some(eval::TestResult {
                metrics: &test_metrics,
                labels: &test.labels,
                probs: &test_probs,
                num_classes: num_labels,
                intervals: Some(&test_intervals),
            }),
        },
    )?;
    // Written last: its presence marks the run as finished (`run_seeds` reuses such runs).
    let mut dev_json = serde_json::to_value(&dev_best)?;
    dev_json["step"] = serde_json::json!(state.best_step);
    crate::fsutil::write_json_atomic(
        &run_dir.join("metrics.json"),
        &serde_json::json!({
            "dev_best": dev_json,
            "test": test_metrics,
            "test_intervals": test_intervals,
            "metric": cfg.metric,
            "overlap": overlap
        }),
    )?;
    print_summary(
        &dev_best,
        &test_metrics,
        &test_intervals,
        state.best_step,
        &run_dir,
    );
    Ok(RunSummary {
        dev_best,
        test: test_metrics,
        best_step: state.best_step,
        steps: state.step,
        run_dir,
    })
}

/// Prints a line above the progress bar, or plainly when the bar is hidden (output not a
/// terminal, e.g. a log file or CI), where indicatif would drop it.
pub(crate) fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// A per-step seed for dropout masks, so that a resumed run draws the same masks.
fn mix_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut x = seed
        ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (micro as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x.wrapping_mul(0x94D0_49BB_1331_11EB)
}

/// Writes the best model: a full model directory, or a PEFT adapter that names its base.
struct BestSaver<'a> {
    cfg: &'a TrainConfig,
    lora: Option<&'a LoraConfig>,
    model_cfg: &'a model::config::ModelConfig,
    tokenizer: &'a dyn Tokenizer,
}

impl BestSaver<'_> {
    fn save(&self, dir: &Path, params: &ParamStore) -> Result<()> {
        let tmp = dir.with_extension("partial");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        match self.lora {
            None => {
                model::save_model_dir(&tmp, self.model_cfg, params, self.tokenizer, DType::F32)?
            }
            Some(lora) => adapter::save_adapter(&tmp, lora, params, &self.cfg.model)?,
        }
        let record = model::record::CheckpointRecord {
            pooling: self.cfg.pooling,
            max_length: Some(self.cfg.max_length),
            quantize: self.cfg.method.quantize(),
            precision: self.cfg.precision,
            average_strands: self.cfg.average_strands,
        };
        model::record::write_record(&tmp, &record)?;
        state::replace_dir(&tmp, dir)
    }
}

/// Puts the best checkpoint's trainable tensors back into the model.
fn restore_best(dir: &Path, method: Method, params: &ParamStore, device: &Device) -> Result<()> {
    // The best checkpoint is dnatune's own, written under the model's own names.
    let tensors = match method {
        Method::Full => model::checkpoint::load_weights(dir, device)?.0,
        Method::Lora | Method::QloraInt8 | Method::QloraNf4 => {
            adapter::load_adapter(dir, device)?.tensors
        }
    };
    for (name, var) in params.trainable() {
        let t = tensors
            .get(name)
            .with_context(|| format!("best checkpoint {} lacks `{name}`", dir.display()))?;
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(())
}

fn write_log(run_dir: &Path, log: &[LogEntry]) -> Result<()> {
    crate::fsutil::write_jsonl_atomic(&run_dir.join("log.jsonl"), log)
}

/// `id,length[,label],prediction,prob_0..`, one row per record.
pub fn write_predictions(
    path: &Path,
    records: &[Record],
    probs: &[f32],
    num_labels: usize,
    with_labels: bool,
) -> Result<()> {
    crate::fsutil::write_atomic_with(path, |w| {
        use std::io::Write;
        let mut header = String::from(if with_labels {
            "id,length,label,prediction"
        } else {
            "id,length,prediction"
        });
        for c in 0..num_labels {
            header.push_str(&format!(",prob_{c}"));
        }
        writeln!(w, "{header}")?;
        for (i, r) in records.iter().enumerate() {
            let row = &probs[i * num_labels..(i + 1) * num_labels];
            let pred = eval::argmax(row);
            let label = r.label.map_or(String::new(), |l| l.to_string());
            let id = crate::fsutil::csv_field(&r.id);
            if with_labels {
                write!(w, "{id},{},{label},{pred}", r.seq.len())?;
            } else {
                write!(w, "{id},{},{pred}", r.seq.len())?;
            }
            for p in row {
                write!(w, ",{p:.6}")?;
            }
            writeln!(w)?;
        }
        Ok(())
    })
}

fn print_summary(
    dev: &Metrics,
    test: &Metrics,
    intervals: &eval::Intervals,
    best_step: usize,
    run_dir: &Path,
) {
    println!("\nbest checkpoint: step {best_step}");
    let ci = format!("test {:.0} % CI", 100.0 * intervals.level);
    println!("{:<10} {:>8} {:>8}  {ci}", "metric", "dev", "test");
    for name in Metrics::NAMES {
        let fmt = |m: &Metrics| m.get(name).map_or("-".to_string(), |v| format!("{v:.4}"));
        let interval = intervals
            .get(name)
            .map_or(String::new(), |[low, high]| format!("{low:.4}-{high:.4}"));
        println!("{:<10} {:>8} {:>8}  {interval}", name, fmt(dev), fmt(test));
    }
    println!(
        "\nwrote {}/{{metrics.json, log.jsonl, report.html, test_predictions.csv, best/}}",
        run_dir.display()
    );
}

/// Checks that a run directory exists before `--resume` reads it.
pub fn resume_config(run_dir: &Path) -> Result<TrainConfig> {
    let path = run_dir.join("config.toml");
    if !path.exists() {
        bail!(
            "{} is not a dnatune run directory (no config.toml)",
            run_dir.display()
        );
    }
    TrainConfig::from_toml_file(&path)
}
