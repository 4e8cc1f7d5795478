//! Pre-training on a small real slice of the shipped corpus lowers the held-out MLM loss, writes
//! a model directory that fine-tuning loads, and resumes; ESM's masked-LM head against
//! transformers' EsmForMaskedLM.

use std::path::{Path, PathBuf};

use candle_core::DType;
use dnatune::model::config::{Architecture, ModelConfig};
use dnatune::model::mlm::MaskedLm;
use dnatune::model::params::{is_head, ParamBuilder, Trainable};
use dnatune::ops::ForwardCtx;
use dnatune::pretrain::{self, PretrainConfig};
use dnatune::tokenize::{BpeTokenizer, KmerTokenizer, Tokenizer};

/// A randomly initialised encoder of `cfg` without a head, saved as `dir/base`.
fn save_base(dir: &Path, cfg: &ModelConfig, tokenizer: &dyn Tokenizer) -> PathBuf {
    let mut params = dnatune::model::init_params(cfg, 2, 1).unwrap();
    params.entries.retain(|n, _| !is_head(n));
    let base = dir.join("base");
    dnatune::model::save_model_dir(&base, cfg, &params, tokenizer, DType::F32).unwrap();
    base
}

/// Pre-training of `model` into `out` on the shipped corpus slice, 5 % of it held out; tests
/// set the budget and shape.
fn on_corpus_slice(model: PathBuf, out: PathBuf) -> PretrainConfig {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    PretrainConfig {
        model,
        corpus: root.join("tests/fixtures/pretrain-slice.fa.gz"),
        out,
        valid_fraction: 0.05,
        ..PretrainConfig::default()
    }
}

#[test]
fn mlm_pretraining_lowers_validation_loss_and_resumes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tokenizer =
        BpeTokenizer::from_file(&root.join("assets/tokenizers/dna-bpe-4096/tokenizer.json"))
            .unwrap();
    let cfg = ModelConfig::new(
        Architecture::Dnabert2,
        tokenizer.vocab_size(),
        2,
        64,
        2,
        128,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = save_base(tmp.path(), &cfg, &tokenizer);

    let out = tmp.path().join("pretrain");
    let mut pcfg = PretrainConfig {
        max_steps: 200,
        batch_size: 16,
        seq_len: 32,
        lr: 2e-3,
        eval_every: 100,
        checkpoint_every: 100,
        ..on_corpus_slice(base, out.clone())
    };
    // Stop half-way as an interruption would, then resume to the end.
    pcfg.max_steps = 200;
    pcfg.time_limit_minutes = 1e-9;
    let partial = pretrain::run(&pcfg, false).unwrap();
    assert!(partial.steps < 200, "the time limit did not stop the run");
    pcfg.time_limit_minutes = 0.0;
    let done = pretrain::run(&pcfg, true).unwrap();
    assert_eq!(done.steps, 200);
    assert!(
        done.valid_loss < done.first_valid_loss - 0.5,
        "validation MLM loss {} -> {}",
        done.first_valid_loss,
        done.valid_loss
    );
    // The saved directory carries the MLM head and loads as a classifier (head ignored).
    let model_dir = out.join("model");
    let (weights, _) =
        dnatune::model::checkpoint::load_weights(&model_dir, &candle_core::Device::Cpu).unwrap();
    assert!(weights.contains_key("cls.predictions.transform.dense.weight"));
    assert!(weights.contains_key("cls.predictions.decoder.bias"));
    let loaded = dnatune::model::load_classifier(
        &model_dir,
        None,
        &dnatune::model::LoadOptions::default(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(
        loaded.notes.iter().any(|n| n.contains("masked-LM head")),
        "{:?}",
        loaded.notes
    );
}

/// A learning rate far too large stops pre-training at the step whose loss is NaN instead of
/// saving a model of NaN weights.
#[test]
fn pretraining_stops_when_the_loss_diverges() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tokenizer =
        BpeTokenizer::from_file(&root.join("assets/tokenizers/dna-bpe-4096/tokenizer.json"))
            .unwrap();
    let cfg =
        ModelConfig::new(Architecture::Dnabert2, tokenizer.vocab_size(), 1, 32, 2, 64).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = save_base(tmp.path(), &cfg, &tokenizer);
    let out = tmp.path().join("pretrain");
    let pcfg = PretrainConfig {
        max_steps: 20,
        batch_size: 4,
        seq_len: 16,
        lr: 1e30,
        warmup_ratio: 0.0,
        ..on_corpus_slice(base, out.clone())
    };
    let Err(err) = pretrain::run(&pcfg, false) else {
        panic!("pre-training at lr 1e30 finished");
    };
    let err = err.to_string();
    assert!(err.contains("diverged at step"), "{err}");
    assert!(!out.join("model").exists());
}

#[test]
fn esm_masked_lm_head_matches_transformers() {
    // transformers' EsmForMaskedLM (v2 layout, untied decoder): vocabulary logits at every real
    // position, one of them a <mask>.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-nt-v2-mlm");
    let dev = candle_core::Device::Cpu;
    let (weights, _) = dnatune::model::checkpoint::load_weights(&dir, &dev).unwrap();
    let (cfg, _) = ModelConfig::from_dir(&dir, weights.keys().map(String::as_str)).unwrap();
    assert_eq!(cfg.architecture, Architecture::Esm);
    let mut builder = ParamBuilder::new(weights, Trainable::Nothing, 1, Box::new(|_| false), &dev);
    let model = MaskedLm::build(&mut builder, &cfg).unwrap();
    let (_, report) = builder.finish().unwrap();
    assert!(report.initialized.is_empty(), "{:?}", report.initialized);
    assert!(
        report
            .unused
            .iter()
            .all(|n| n.contains("contact_head") || n.ends_with("inv_freq")),
        "the untied decoder must be used: {:?}",
        report.unused
    );

    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let grid =
        |key: &str| -> Vec<Vec<u32>> { serde_json::from_value(expected[key].clone()).unwrap() };
    let (ids, mask) = (grid("input_ids"), grid("attention_mask"));
    let width = ids[0].len();
    let positions: Vec<u32> = mask
        .iter()
        .enumerate()
        .flat_map(|(b, row)| {
            row.iter()
                .enumerate()
                .filter(|(_, &m)| m == 1)
                .map(move |(t, _)| (b * width + t) as u32)
        })
        .collect();
    let tensor = |rows: Vec<Vec<u32>>| {
        candle_core::Tensor::from_vec(rows.concat(), (2, width), &dev).unwrap()
    };
    let got: Vec<Vec<f32>> = model
        .forward(
            &tensor(ids),
            &tensor(mask),
            &candle_core::Tensor::new(positions.as_slice(), &dev).unwrap(),
            &ForwardCtx::eval(),
        )
        .unwrap()
        .to_vec2()
        .unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(expected["logits"].clone()).unwrap();
    assert_eq!((got.len(), got[0].len()), (want.len(), want[0].len()));
    let diff = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "MLM logits differ by {diff}");
}

#[test]
fn nucleotide_transformer_pretrains_and_its_lm_head_is_saved() {
    // A dnatune-initialised NT v2 layout (non-overlapping 3-mers, no end token) pre-trains on the
    // real corpus slice: the held-out loss falls, and the head is saved under ESM's names.
    let tokenizer = KmerTokenizer::non_overlapping(3).unwrap();
    let mut cfg =
        ModelConfig::new(Architecture::Esm, tokenizer.vocab_size(), 2, 64, 2, 128).unwrap();
    let special = tokenizer.special_tokens();
    cfg.raw.insert("pad_token_id".into(), special.pad.into());
    cfg.raw.insert("mask_token_id".into(), special.mask.into());
    let tmp = tempfile::tempdir().unwrap();
    let base = save_base(tmp.path(), &cfg, &tokenizer);
    let out = tmp.path().join("pretrain");
    let pcfg = PretrainConfig {
        max_steps: 150,
        batch_size: 16,
        seq_len: 32,
        lr: 2e-3,
        eval_every: 150,
        ..on_corpus_slice(base, out.clone())
    };
    let done = pretrain::run(&pcfg, false).unwrap();
    // With 64 3-mers, guessing them uniformly costs ln 64 = 4.16 nats and hits 1 in 64: the model
    // must beat both (a fresh one starts at ln 75, the whole vocabulary).
    assert!(
        done.first_valid_loss > 4.2 && done.valid_loss < 64f64.ln() - 0.05,
        "validation MLM loss {} -> {}",
        done.first_valid_loss,
        done.valid_loss
    );
    assert!(done.valid_accuracy > 2.0 / 64.0, "{}", done.valid_accuracy);
    let (weights, _) =
        dnatune::model::checkpoint::load_weights(&out.join("model"), &candle_core::Device::Cpu)
            .unwrap();
    for name in [
        "lm_head.dense.weight",
        "lm_head.layer_norm.weight",
        "lm_head.bias",
    ] {
        assert!(weights.contains_key(name), "{name}");
    }
    // Tied (the config does not untie it): no decoder weight of its own.
    assert!(!weights.contains_key("lm_head.decoder.weight"));
    assert!(!weights.keys().any(|k| k.starts_with("cls.")));
}
