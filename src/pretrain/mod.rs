//! Masked-language-model pre-training (DNABERT-2's objective): random crops of a DNA corpus,
//! 15 % masking, the MLM head tied to the word embeddings, AdamW with warm-up and decay,
//! validation loss and masked-token accuracy on held-out sequence, checkpoints and exact resume.

pub mod corpus;
pub mod masking;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::checkpoint;
use crate::model::config::ModelConfig;
use crate::model::mlm::{is_mlm_head, MaskedLm};
use crate::model::params::{ParamBuilder, ParamStore, Trainable};
use crate::ops::ForwardCtx;
use crate::tokenize::{load_tokenizer, Tokenizer};
use crate::train::config::Scheduler;
use crate::train::optim::{
    check_loss_is_finite, clip_grad_norm, learning_rate, AdamW, OptimiserSettings,
};

/// Pre-training settings (TOML keys; written to `OUT/pretrain.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    pub model: PathBuf,
    pub corpus: PathBuf,
    pub out: PathBuf,
    pub seed: u64,
    /// Optimiser steps; the learning-rate schedule spans them.
    pub max_steps: usize,
    /// Stop (with a checkpoint, resumable) after this many minutes of this process (0: no limit).
    pub time_limit_minutes: f64,
    pub batch_size: usize,
    /// Tokens per window including [CLS] and [SEP].
    pub seq_len: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    pub scheduler: Scheduler,
    pub max_grad_norm: f64,
    pub mask_prob: f64,
    /// Fraction of corpus sequences held out for validation.
    pub valid_fraction: f64,
    /// Validation windows scored at each evaluation.
    pub valid_windows: usize,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    pub log_every: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            model: PathBuf::new(),
            corpus: PathBuf::new(),
            out: PathBuf::from("runs/pretrain"),
            seed: 42,
            max_steps: 10_000,
            time_limit_minutes: 0.0,
            batch_size: 32,
            seq_len: 128,
            lr: 5e-4,
            weight_decay: 0.01,
            warmup_ratio: 0.05,
            scheduler: Scheduler::Linear,
            max_grad_norm: 1.0,
            mask_prob: 0.15,
            valid_fraction: 0.01,
            valid_windows: 256,
            eval_every: 500,
            checkpoint_every: 500,
            log_every: 20,
            device: "cpu".into(),
        }
    }
}

/// One line of `OUT/log.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PretrainLog {
    Train {
        step: usize,
        tokens: u64,
        loss: f64,
        lr: f64,
        tokens_per_s: f64,
    },
    Valid {
        step: usize,
        tokens: u64,
        loss: f64,
        accuracy: f64,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct PretrainState {
    step: usize,
    tokens: u64,
    optimizer_steps: usize,
    log: Vec<PretrainLog>,
}

/// What pre-training reached.
pub struct PretrainSummary {
    pub steps: usize,
    pub tokens: u64,
    pub valid_loss: f64,
    pub valid_accuracy: f64,
    pub first_valid_loss: f64,
}

fn step_rng(seed: u64, step: usize, salt: u64) -> StdRng {
    StdRng::seed_from_u64(
        seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93),
    )
}

/// Masked batch tensors: ids, attention mask, chosen positions and their targets.
fn masked_batch(
    windows: &[Vec<u32>],
    tokenizer: &dyn Tokenizer,
    prob: f64,
    rng: &mut StdRng,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let special = tokenizer.special_tokens();
    let idx: Vec<usize> = (0..windows.len()).collect();
    let batch = crate::batch::collate(&idx, windows, special.pad);
    let first_ordinary = [
        special.unk,
        special.cls,
        special.sep,
        special.pad,
        special.mask,
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
        + 1;
    let m = masking::mask_tokens(
        &batch.input_ids,
        &special,
        tokenizer.vocab_size(),
        first_ordinary,
        prob,
        rng,
    );
    let shape = (batch.batch_size, batch.seq_len);
    Ok((
        Tensor::from_vec(m.input_ids, shape, device)?,
        Tensor::from_vec(batch.attention_mask, shape, device)?,
        Tensor::from_vec(m.positions.clone(), m.positions.len(), device)?,
        Tensor::from_vec(m.targets, m.positions.len(), device)?,
    ))
}

/// Mean masked-token loss and accuracy on fixed, fixed-masked validation windows.
fn validate(
    model: &MaskedLm,
    windows: &[Vec<u32>],
    tokenizer: &dyn Tokenizer,
    cfg: &PretrainConfig,
    device: &Device,
) -> Result<(f64, f64)> {
    let (mut loss_sum, mut correct, mut count) = (0f64, 0usize, 0usize);
    let ctx = ForwardCtx::eval();
    for (b, chunk) in windows.chunks(cfg.batch_size).enumerate() {
        let mut rng = step_rng(cfg.seed, b, 0xBA1);
        let (ids, mask, pos, targets) =
            masked_batch(chunk, tokenizer, cfg.mask_prob, &mut rng, device)?;
        let logits = model.forward(&ids, &mask, &pos, &ctx)?.detach();
        let n = targets.dim(0)?;
        loss_sum += candle_nn::loss::cross_entropy(&logits, &targets)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            * n as f64;
        let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        let t: Vec<u32> = targets.to_vec1()?;
        correct += pred.iter().zip(&t).filter(|(a, b)| a == b).count();
        count += n;
    }
    Ok((
        loss_sum / count.max(1) as f64,
        correct as f64 / count.max(1) as f64,
    ))
}

/// Pre-trains (or, with `resume`, continues pre-training) as `cfg` says.
pub fn run(cfg: &PretrainConfig, resume: bool) -> Result<PretrainSummary> {
    if cfg.batch_size == 0 || cfg.seq_len < 8 || cfg.max_steps == 0 {
        bail!("batch_size and max_steps must be positive and seq_len at least 8");
    }
    let optimiser = OptimiserSettings {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        max_grad_norm: cfg.max_grad_norm,
    };
    optimiser.validate()?;
    let device = crate::device::parse_device(&cfg.device)?;
    crate::device::seed_generator(&device, cfg.seed)?;
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("cannot create {}", cfg.out.display()))?;
    let tokenizer = load_tokenizer(&cfg.model)?;
    let stretches = corpus::read_corpus(&cfg.corpus)?;
    let streams =
        corpus::build_streams(&stretches, tokenizer.as_ref(), cfg.valid_fraction, cfg.seed);
    drop(stretches);
    if streams.train.len() < cfg.seq_len || streams.valid.is_empty() {
        bail!(
            "{}: corpus too small for windows of {} tokens with a validation part",
            cfg.corpus.display(),
            cfg.seq_len
        );
    }
    println!(
        "corpus {}: {} bases, {} training tokens ({:.2} bases per token), {} validation tokens",
        cfg.corpus.display(),
        streams.bases,
        streams.train.len(),
        streams.bases as f64 / (streams.train.len() + streams.valid.len()) as f64,
        streams.valid.len()
    );
    let special = tokenizer.special_tokens();
    // Windows are framed as the tokenizer frames a sequence: [CLS] .. [SEP], or <cls> .. alone.
    let end = tokenizer.encode("", None).get(1).copied();
    let body = cfg.seq_len - 1 - usize::from(end.is_some());
    let valid_windows: Vec<Vec<u32>> = streams
        .valid
        .chunks(body)
        .take(cfg.valid_windows)
        .map(|c| [&[special.cls][..], c, end.as_slice()].concat())
        .collect();

    // The model: a checkpoint's encoder (and MLM head, when it has one).
    let (weights, _) = checkpoint::load_weights(&cfg.model, &device)?;
    let (model_cfg, detection) =
        ModelConfig::from_dir(&cfg.model, weights.keys().map(String::as_str))?;
    println!("model: {} ({detection})", model_cfg.architecture);
    let weights = checkpoint::normalize_prefix(weights, model_cfg.architecture.weight_prefix())?;
    let mut builder = ParamBuilder::new(
        weights,
        Trainable::All,
        cfg.seed,
        Box::new(is_mlm_head),
        &device,
    );
    let model = MaskedLm::build(&mut builder, &model_cfg)?;
    let (params, report) = builder.finish()?;
    if !report.initialized.is_empty() {
        println!(
            "model: initialised a fresh masked-LM head ({} tensors)",
            report.initialized.len()
        );
    }
    println!("parameters: {}", params.num_params());
    let mut opt = AdamW::new(
        params.trainable(),
        optimiser.beta1,
        optimiser.beta2,
        optimiser.eps,
        optimiser.weight_decay,
    )?;
    let mut state = if resume {
        load_checkpoint(&cfg.out, &params, &mut opt)?
    } else {
        PretrainState::default()
    };
    if !resume {
        crate::fsutil::write_atomic(
            &cfg.out.join("pretrain.toml"),
            toml::to_string_pretty(cfg)?.as_bytes(),
        )?;
    }
    let warmup = (cfg.warmup_ratio * cfg.max_steps as f64).round() as usize;
    let bar = ProgressBar::new(cfg.max_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(state.step as u64);
    let mut window = (0f64, 0usize, 0u64, Instant::now());
    let evaluate = |state: &mut PretrainState, bar: &ProgressBar| -> Result<(f64, f64)> {
        let (loss, acc) = validate(&model, &valid_windows, tokenizer.as_ref(), cfg, &device)?;
        crate::train::say(
            bar,
            format!(
                "step {:>7}  tokens {:>11}  valid MLM loss {loss:.4}  masked accuracy {acc:.4}",
                state.step, state.tokens
            ),
        );
        state.log.push(PretrainLog::Valid {
            step: state.step,
            tokens: state.tokens,
            loss,
            accuracy: acc,
        });
        Ok((loss, acc))
    };
    if state.log.is_empty() {
        evaluate(&mut state, &bar)?;
    }
    let out_of_time = || {
        cfg.time_limit_minutes > 0.0
            && started.elapsed().as_secs_f64() > cfg.time_limit_minutes * 60.0
    };
    while state.step < cfg.max_steps {
        let mut rng = step_rng(cfg.seed, state.step, 0x7AA1);
        let windows: Vec<Vec<u32>> = (0..cfg.batch_size)
            .map(|_| corpus::random_window(&streams.train, cfg.seq_len, special.cls, end, &mut rng))
            .collect();
        let (ids, mask, pos, targets) = masked_batch(
            &windows,
            tokenizer.as_ref(),
            cfg.mask_prob,
            &mut rng,
            &device,
        )?;
        let ctx = ForwardCtx::train(rng.random());
        let logits = model.forward(&ids, &mask, &pos, &ctx)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        check_loss_is_finite(loss_value, state.step + 1, cfg.lr)?;
        let store = loss.backward()?;
        let mut grads = params.gradients(&store);
        clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        let lr = learning_rate(cfg.scheduler, cfg.lr, state.step, warmup, cfg.max_steps);
        opt.step(&grads, lr)?;
        state.step += 1;
        let tokens: u64 = windows.iter().map(|w| w.len() as u64).sum();
        state.tokens += tokens;
        window.0 += loss_value;
        window.1 += 1;
        window.2 += tokens;
        bar.inc(1);
        if state.step % cfg.log_every.max(1) == 0 {
            let tps = window.2 as f64 / window.3.elapsed().as_secs_f64().max(1e-9);
            let mean = window.0 / window.1 as f64;
            bar.set_message(format!("loss {mean:.4}  lr {lr:.2e}  {tps:.0} tokens/s"));
            state.log.push(PretrainLog::Train {
                step: state.step,
                tokens: state.tokens,
                loss: mean,
                lr,
                tokens_per_s: tps,
            });
            window = (0.0, 0, 0, Instant::now());
        }
        if state.step % cfg.eval_every.max(1) == 0 || state.step == cfg.max_steps {
            evaluate(&mut state, &bar)?;
        }
        // One reading of the clock decides both, so a time-limited stop is always checkpointed.
        let stop = out_of_time();
        if stop || state.step % cfg.checkpoint_every.max(1) == 0 || state.step == cfg.max_steps {
            state.optimizer_steps = opt.t;
            save_checkpoint(
                &cfg.out,
                &state,
                &params,
                &opt,
                &model_cfg,
                tokenizer.as_ref(),
            )?;
        }
        if stop {
            break;
        }
    }
    bar.finish_and_clear();
    let valids: Vec<(f64, f64)> = state
        .log
        .iter()
        .filter_map(|e| match e {
            PretrainLog::Valid { loss, accuracy, .. } => Some((*loss, *accuracy)),
            PretrainLog::Train { .. } => None,
        })
        .collect();
    let (first, last) = (valids[0], *valids.last().expect("at least one validation"));
    if state.step < cfg.max_steps {
        println!(
            "time limit reached at step {}: continue with `dnatune pretrain --resume {}`",
            state.step,
            cfg.out.display()
        );
    }
    println!(
        "pre-trained {} steps, {} tokens; validation MLM loss {:.4} -> {:.4}, masked accuracy {:.4} -> {:.4}; model in {}",
        state.step, state.tokens, first.0, last.0, first.1, last.1, cfg.out.join("model").display()
    );
    Ok(PretrainSummary {
        steps: state.step,
        tokens: state.tokens,
        valid_loss: last.0,
        valid_accuracy: last.1,
        first_valid_loss: first.0,
    })
}

/// Writes `OUT/model` (a loadable model directory with the MLM head), and `OUT/checkpoint`
/// (optimiser moments and loop state) for `--resume`.
fn save_checkpoint(
    out: &Path,
    state: &PretrainState,
    params: &ParamStore,
    opt: &AdamW,
    model_cfg: &ModelConfig,
    tokenizer: &dyn Tokenizer,
) -> Result<()> {
    let tmp = out.join("model.partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    crate::model::save_model_dir(&tmp, model_cfg, params, tokenizer, DType::F32)?;
    crate::train::replace_dir(&tmp, &out.join("model"))?;
    let tmp = out.join("checkpoint.partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    checkpoint::save_safetensors(&tmp.join("optimizer.safetensors"), &opt.state(), DType::F32)?;
    crate::fsutil::write_json_atomic(&tmp.join("state.json"), state)?;
    crate::train::replace_dir(&tmp, &out.join("checkpoint"))?;
    crate::fsutil::write_jsonl_atomic(&out.join("log.jsonl"), &state.log)
}

fn load_checkpoint(out: &Path, params: &ParamStore, opt: &mut AdamW) -> Result<PretrainState> {
    let dir = out.join("checkpoint");
    let text = std::fs::read_to_string(dir.join("state.json")).with_context(|| {
        format!(
            "{} holds no pre-training checkpoint to resume",
            out.display()
        )
    })?;
    let state: PretrainState = serde_json::from_str(&text)?;
    let (weights, _) = checkpoint::load_weights(&out.join("model"), &Device::Cpu)?;
    for (name, var) in params.trainable() {
        var.set(
            &weights
                .get(name)
                .with_context(|| format!("saved model lacks `{name}`"))?
                .to_device(var.device())?,
        )?;
    }
    let opt_state =
        candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
    opt.load_state(&opt_state, state.optimizer_steps)?;
    println!("resuming pre-training at step {}", state.step);
    Ok(state)
}
