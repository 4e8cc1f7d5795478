//! The encoders against independent references (a PyTorch DNABERT-2 module and Hugging Face's own
//! BertForSequenceClassification and EsmForSequenceClassification, via committed fixtures),
//! finite-difference gradient checks in
//! f64, LoRA invariants, and checkpoint round trips.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use dnatune::model::config::{Architecture, ModelConfig};
use dnatune::model::params::{ParamBuilder, ParamStore, Trainable};
use dnatune::model::{self, LoadOptions, Pooling, SequenceClassifier};
use dnatune::ops::{alibi_slopes, with_plain_kernels, ForwardCtx, Initializer};
use dnatune::peft::{Linear, LoraConfig};
use dnatune::tokenize::SingleNucleotideTokenizer;
use dnatune::train::optim::AdamW;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Expected {
    ids: Tensor,
    mask: Tensor,
    logits: Vec<Vec<f32>>,
    json: serde_json::Value,
}

fn expected(dir: &Path) -> Expected {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let grid = |key: &str| -> Vec<Vec<u32>> { serde_json::from_value(json[key].clone()).unwrap() };
    let to_tensor = |rows: Vec<Vec<u32>>| {
        let (b, t) = (rows.len(), rows[0].len());
        Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
    };
    Expected {
        ids: to_tensor(grid("input_ids")),
        mask: to_tensor(grid("attention_mask")),
        logits: serde_json::from_value(json["logits"].clone()).unwrap(),
        json,
    }
}

fn load(dir: &Path, opts: &LoadOptions) -> model::LoadedModel {
    model::load_classifier(dir, None, opts, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn logits(model: &SequenceClassifier, ids: &Tensor, mask: &Tensor) -> Vec<Vec<f32>> {
    model
        .forward(ids, mask, &ForwardCtx::eval())
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Copies a fixture keeping only `config.json` and one weight file, so that format is the one read.
fn with_only(dir: &Path, weights: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", weights] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

#[test]
fn dnabert2_matches_pytorch_reference_from_safetensors_and_bin() {
    let dir = fixture("tiny-dnabert2");
    let exp = expected(&dir);
    for weights in ["model.safetensors", "pytorch_model.bin"] {
        let tmp = with_only(&dir, weights);
        let loaded = load(tmp.path(), &LoadOptions::default());
        assert_eq!(
            loaded.config.architecture,
            Architecture::Dnabert2,
            "{}",
            loaded.detection
        );
        assert!(
            loaded.report.initialized.is_empty(),
            "{:?}",
            loaded.report.initialized
        );
        let got = logits(&loaded.model, &exp.ids, &exp.mask);
        let diff = max_abs_diff(&got, &exp.logits);
        assert!(
            diff < 1e-5,
            "{weights}: logits differ by {diff}: {got:?} vs {:?}",
            exp.logits
        );
    }
    let slopes: Vec<f64> = serde_json::from_value(exp.json["alibi_slopes"].clone()).unwrap();
    for (a, b) in alibi_slopes(6).iter().zip(&slopes) {
        assert!((a - b).abs() < 1e-12);
    }
}

#[test]
fn classic_bert_matches_transformers() {
    let dir = fixture("tiny-bert");
    let exp = expected(&dir);
    for weights in ["model.safetensors", "pytorch_model.bin"] {
        let tmp = with_only(&dir, weights);
        let loaded = load(tmp.path(), &LoadOptions::default());
        assert_eq!(loaded.config.architecture, Architecture::Bert);
        let got = logits(&loaded.model, &exp.ids, &exp.mask);
        let diff = max_abs_diff(&got, &exp.logits);
        assert!(diff < 1e-5, "{weights}: logits differ by {diff}");
    }
}

/// An ESM fixture against transformers' logits, from either weight file; `layout` is what the
/// detection must say, and the fixture's `<mask>`-free rows must be what dnatune's tokenizer
/// makes of its sequences.
fn check_esm_fixture(name: &str, reason: &str, rows_from_sequences: &[usize]) {
    let dir = fixture(name);
    let exp = expected(&dir);
    for weights in ["model.safetensors", "pytorch_model.bin"] {
        let tmp = with_only(&dir, weights);
        let loaded = load(tmp.path(), &LoadOptions::default());
        assert_eq!(loaded.config.architecture, Architecture::Esm);
        assert!(loaded.detection.contains(reason), "{}", loaded.detection);
        assert!(
            loaded.report.initialized.is_empty(),
            "{:?}",
            loaded.report.initialized
        );
        // The contact head is named as a pre-training head, nothing as unexpected.
        assert!(
            !loaded.notes.iter().any(|n| n.contains("unexpected")),
            "{:?}",
            loaded.notes
        );
        let got = logits(&loaded.model, &exp.ids, &exp.mask);
        let diff = max_abs_diff(&got, &exp.logits);
        assert!(
            diff < 1e-5,
            "{name} {weights}: logits differ by {diff}: {got:?} vs {:?}",
            exp.logits
        );
    }
    let tokenizer = dnatune::tokenize::load_tokenizer(&dir).unwrap();
    let sequences: Vec<String> = serde_json::from_value(exp.json["sequences"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(exp.json["input_ids"].clone()).unwrap();
    let pad = tokenizer.special_tokens().pad;
    for &row in rows_from_sequences {
        let mut want = ids[row].clone();
        while want.last() == Some(&pad) {
            want.pop();
        }
        assert_eq!(tokenizer.encode(&sequences[row], None), want, "row {row}");
    }
}

#[test]
fn nucleotide_transformer_v1_layout_matches_transformers() {
    // Learned positions from pad_token_id + 1, GELU, token dropout (row 1 holds a <mask>).
    check_esm_fixture("tiny-esm", "model_type", &[0, 2]);
}

#[test]
fn nucleotide_transformer_v2_layout_matches_transformers() {
    // Rotary positions and bias-free SwiGLU; detected by its auto_map, as released v2 configs.
    check_esm_fixture("tiny-nt-v2", "auto_map", &[0, 1, 2]);
}

#[test]
fn padding_does_not_change_a_sequences_logits() {
    let loaded = load(&fixture("tiny-dnabert2"), &LoadOptions::default());
    let ids = Tensor::new(&[[1u32, 10, 20, 30, 2, 3, 3]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let short_ids = ids.narrow(1, 0, 5).unwrap();
    let short_mask = mask.narrow(1, 0, 5).unwrap();
    let padded = logits(&loaded.model, &ids, &mask);
    let unpadded = logits(&loaded.model, &short_ids, &short_mask);
    assert!(max_abs_diff(&padded, &unpadded) < 1e-5);
}

/// Central finite differences of `loss` w.r.t. a few entries of `var`, against autograd.
fn check_gradient(var: &Var, loss: &dyn Fn() -> Tensor, entries: &[usize], what: &str) {
    let grads = loss().backward().unwrap();
    let analytic: Vec<f64> = grads
        .get(var)
        .unwrap_or_else(|| panic!("no gradient for {what}"))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    for &i in entries {
        let eval_at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss().to_scalar::<f64>().unwrap()
        };
        let numeric = (eval_at(h) - eval_at(-h)) / (2.0 * h);
        var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let err = (numeric - analytic[i]).abs() / numeric.abs().max(1e-3);
        assert!(
            err < 1e-5,
            "{what}[{i}]: finite difference {numeric} vs autograd {}",
            analytic[i]
        );
    }
}

/// An f64 tensor of normal samples.
fn normal_f64(init: &mut Initializer, dims: &[usize], std: f64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(init.normal(n, std), dims, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// The largest absolute difference between two f64 tensors.
fn max_tensor_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn lora_linear_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let lora = LoraConfig {
        r: 3,
        alpha: 6.0,
        dropout: 0.0,
        target_modules: vec!["proj".into()],
    };
    let mut b = ParamBuilder::fresh(1, &dev)
        .with_dtype(DType::F64)
        .with_lora(Some(lora));
    let layer = Linear::build(&mut b, "proj", 5, 4, true, 0.5).unwrap();
    let (params, _) = b.finish().unwrap();
    // B starts at zero, which would make A's gradient vanish: give B values first.
    let var = |n: &str| params.entries[n].var.clone().unwrap();
    let b_var = var("proj.lora_B.weight");
    let mut init = Initializer::new(9);
    b_var.set(&normal_f64(&mut init, &[4, 3], 0.5)).unwrap();
    let x = Var::from_tensor(&normal_f64(&mut init, &[2, 3, 5], 1.0)).unwrap();
    let w = normal_f64(&mut init, &[2, 3, 4], 1.0);
    let loss = || {
        layer
            .forward(&x, &ForwardCtx::eval())
            .unwrap()
            .tanh()
            .unwrap()
            .mul(&w)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    check_gradient(&var("proj.lora_A.weight"), &loss, &[0, 4, 14], "lora_A");
    check_gradient(&b_var, &loss, &[0, 5, 11], "lora_B");
    check_gradient(&var("proj.weight"), &loss, &[0, 7, 19], "weight");
    check_gradient(&var("proj.bias"), &loss, &[0, 3], "bias");
    check_gradient(&x, &loss, &[0, 13, 29], "input");
}

fn tiny_config(arch: Architecture, layers: usize) -> ModelConfig {
    let mut cfg = ModelConfig::new(arch, 16, layers, 12, 3, 20).unwrap();
    cfg.max_position_embeddings = 16;
    if arch == Architecture::Esm {
        // Token 3 pads the second sequence; token 9 (in the first) is <mask>.
        cfg.raw.insert("pad_token_id".into(), 3.into());
        cfg.raw.insert("mask_token_id".into(), 9.into());
    }
    cfg
}

/// A one-layer f64 classifier of `arch` and its loss on two sequences, the second padded (so
/// masked keys must pass no gradient through attention): what the finite-difference tests probe.
fn tiny_classifier_loss(
    arch: Architecture,
    seed: u64,
    pooling: Pooling,
) -> (ParamStore, impl Fn() -> Tensor) {
    tiny_classifier_loss_of(tiny_config(arch, 1), seed, pooling)
}

fn tiny_classifier_loss_of(
    cfg: ModelConfig,
    seed: u64,
    pooling: Pooling,
) -> (ParamStore, impl Fn() -> Tensor) {
    let dev = Device::Cpu;
    let mut b = ParamBuilder::fresh(seed, &dev).with_dtype(DType::F64);
    let model = SequenceClassifier::build(&mut b, &cfg, 2, pooling).unwrap();
    let (params, _) = b.finish().unwrap();
    let ids = Tensor::new(&[[1u32, 7, 9, 5, 2], [1, 12, 6, 2, 3]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 1, 0]], &dev).unwrap();
    let labels = Tensor::new(&[1u32, 0], &dev).unwrap();
    let loss = move || {
        let logits = model.forward(&ids, &mask, &ForwardCtx::eval()).unwrap();
        candle_nn::loss::cross_entropy(&logits, &labels).unwrap()
    };
    (params, loss)
}

#[test]
fn dnabert2_layer_gradients_match_finite_differences() {
    let (params, loss) = tiny_classifier_loss(Architecture::Dnabert2, 3, Pooling::Cls);
    let var = |n: &str| params.entries[n].var.clone().unwrap();
    let p = "bert.encoder.layer.0";
    check_gradient(
        &var(&format!("{p}.attention.self.Wqkv.weight")),
        &loss,
        &[0, 50, 200, 431],
        "Wqkv",
    );
    check_gradient(
        &var(&format!("{p}.attention.self.Wqkv.bias")),
        &loss,
        &[2, 30],
        "Wqkv.bias",
    );
    check_gradient(
        &var(&format!("{p}.mlp.gated_layers.weight")),
        &loss,
        &[3, 100, 479],
        "gated_layers",
    );
    check_gradient(&var(&format!("{p}.mlp.wo.weight")), &loss, &[0, 131], "wo");
    check_gradient(
        &var(&format!("{p}.attention.output.LayerNorm.weight")),
        &loss,
        &[1, 11],
        "LayerNorm",
    );
    check_gradient(
        &var("bert.embeddings.word_embeddings.weight"),
        &loss,
        &[7 * 12 + 2, 12 * 12 + 5],
        "embeddings",
    );
}

#[test]
fn bert_layer_gradients_match_finite_differences() {
    let (params, loss) = tiny_classifier_loss(Architecture::Bert, 4, Pooling::Mean);
    let var = |n: &str| params.entries[n].var.clone().unwrap();
    let p = "bert.encoder.layer.0";
    for (name, entries) in [
        ("attention.self.query.weight", &[0usize, 50, 143][..]),
        ("attention.self.key.weight", &[3, 77]),
        ("attention.self.value.weight", &[5, 130]),
        ("attention.self.value.bias", &[2, 11]),
        ("attention.output.dense.weight", &[1, 99]),
        ("intermediate.dense.weight", &[0, 100, 239]),
        ("output.dense.weight", &[4, 200]),
        ("output.LayerNorm.weight", &[1, 11]),
    ] {
        check_gradient(&var(&format!("{p}.{name}")), &loss, entries, name);
    }
    check_gradient(
        &var("bert.embeddings.position_embeddings.weight"),
        &loss,
        &[2 * 12 + 3, 3 * 12 + 7],
        "position embeddings",
    );
}

/// The ESM layer's parameters in both Nucleotide Transformer layouts: `v2` (rotary, SwiGLU
/// without biases) or v1 with the rest switched on (learned positions, GELU with biases, token
/// dropout with a `<mask>` in the batch, a LayerNorm on the embeddings).
fn check_esm_gradients(v2: bool) {
    let mut cfg = tiny_config(Architecture::Esm, 1);
    if !v2 {
        for (key, value) in [
            ("position_embedding_type", serde_json::json!("absolute")),
            ("token_dropout", serde_json::json!(true)),
            ("emb_layer_norm_before", serde_json::json!(true)),
        ] {
            cfg.raw.insert(key.into(), value);
        }
        cfg.raw.remove("add_bias_fnn");
        // Positions count from pad_token_id + 1 = 4.
        cfg.max_position_embeddings = 12;
    }
    let (params, loss) = tiny_classifier_loss_of(cfg, 5, Pooling::Cls);
    let var = |n: &str| params.entries[n].var.clone().unwrap();
    let p = "esm.encoder.layer.0";
    for (name, entries) in [
        ("attention.LayerNorm.weight", &[0usize, 7][..]),
        ("attention.self.query.weight", &[0, 50, 143]),
        ("attention.self.key.weight", &[3, 77]),
        ("attention.self.key.bias", &[1, 10]),
        ("attention.self.value.weight", &[5, 130]),
        ("attention.output.dense.weight", &[1, 99]),
        ("LayerNorm.bias", &[2, 9]),
        ("intermediate.dense.weight", &[0, 100, 239]),
        ("output.dense.weight", &[4, 200]),
    ] {
        check_gradient(&var(&format!("{p}.{name}")), &loss, entries, name);
    }
    check_gradient(
        &var("esm.encoder.emb_layer_norm_after.weight"),
        &loss,
        &[0, 11],
        "emb_layer_norm_after",
    );
    check_gradient(
        &var("esm.embeddings.word_embeddings.weight"),
        &loss,
        &[7 * 12 + 2, 12 * 12 + 5],
        "word embeddings",
    );
    assert_eq!(
        params
            .entries
            .contains_key(&format!("{p}.intermediate.dense.bias")),
        !v2
    );
    if v2 {
        assert_eq!(
            params.entries[&format!("{p}.intermediate.dense.weight")]
                .tensor
                .dims(),
            &[40, 12],
            "SwiGLU projects to twice the intermediate width"
        );
    } else {
        check_gradient(
            &var("esm.embeddings.position_embeddings.weight"),
            &loss,
            &[4 * 12 + 3, 6 * 12 + 7],
            "position embeddings",
        );
        check_gradient(
            &var("esm.embeddings.layer_norm.weight"),
            &loss,
            &[1, 8],
            "embedding LayerNorm",
        );
    }
}

#[test]
fn esm_v2_layer_gradients_match_finite_differences() {
    check_esm_gradients(true);
}

#[test]
fn esm_v1_layer_gradients_match_finite_differences() {
    check_esm_gradients(false);
}

#[test]
fn lora_with_zero_b_gives_base_logits_and_only_adapters_and_head_train() {
    let dir = fixture("tiny-dnabert2");
    let exp = expected(&dir);
    let base = load(&dir, &LoadOptions::default());
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["Wqkv".into(), "wo".into()],
    };
    let opts = LoadOptions {
        trainable: Trainable::AdaptersAndHead,
        lora: Some(lora),
        ..LoadOptions::default()
    };
    let adapted = load(&dir, &opts);
    assert_eq!(
        logits(&adapted.model, &exp.ids, &exp.mask),
        logits(&base.model, &exp.ids, &exp.mask)
    );

    let trainable: Vec<&String> = adapted.params.trainable().map(|(n, _)| n).collect();
    assert!(trainable.iter().all(|n| n.contains(".lora_")
        || n.starts_with("bert.pooler.")
        || n.starts_with("classifier.")));
    assert_eq!(
        trainable.iter().filter(|n| n.contains(".lora_")).count(),
        2 * 2 * 2
    );

    let before: HashMap<String, Vec<f32>> = adapted
        .params
        .entries
        .iter()
        .map(|(n, p)| {
            (
                n.clone(),
                p.tensor.flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    let mut opt = AdamW::new(adapted.params.trainable(), 0.9, 0.999, 1e-8, 0.0).unwrap();
    let logits_t = adapted
        .model
        .forward(&exp.ids, &exp.mask, &ForwardCtx::train(1))
        .unwrap();
    let labels = Tensor::new(&[1u32, 0, 1], &Device::Cpu).unwrap();
    let store = candle_nn::loss::cross_entropy(&logits_t, &labels)
        .unwrap()
        .backward()
        .unwrap();
    let grads: HashMap<String, Tensor> = adapted
        .params
        .trainable()
        .filter_map(|(n, v)| store.get(v).map(|g| (n.clone(), g.clone())))
        .collect();
    opt.step(&grads, 1e-2).unwrap();
    for (name, p) in &adapted.params.entries {
        let now: Vec<f32> = p.tensor.flatten_all().unwrap().to_vec1().unwrap();
        let changed = now != before[name];
        let should = name.contains(".lora_B")
            || name.starts_with("bert.pooler.")
            || name.starts_with("classifier.");
        // lora_A receives a zero gradient while B is still zero (dL/dA = B^T ...), so it stays put.
        assert_eq!(changed, should, "{name} changed: {changed}");
    }
}

#[test]
fn saved_model_reloads_with_identical_logits_and_bad_shapes_are_named() {
    let mut cfg = tiny_config(Architecture::Bert, 2);
    cfg.vocab_size = 10;
    cfg.num_labels = Some(3);
    let params = model::init_params(&cfg, 3, 11).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model::save_model_dir(
        tmp.path(),
        &cfg,
        &params,
        &SingleNucleotideTokenizer::new(),
        DType::F32,
    )
    .unwrap();
    let ids = Tensor::new(&[[2u32, 5, 6, 7, 3], [2, 8, 3, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let mut b = ParamBuilder::new(
        params.tensors(|_| true),
        Trainable::Nothing,
        0,
        Box::new(|_| false),
        &Device::Cpu,
    );
    let in_memory = SequenceClassifier::build(&mut b, &cfg, 3, Pooling::Cls).unwrap();
    let reloaded = load(tmp.path(), &LoadOptions::default());
    assert_eq!(reloaded.model.num_labels, 3);
    assert_eq!(
        logits(&reloaded.model, &ids, &mask),
        logits(&in_memory, &ids, &mask)
    );

    let mut tensors = params.tensors(|_| true);
    tensors.insert(
        "bert.encoder.layer.1.intermediate.dense.weight".into(),
        Tensor::zeros((19, 12), DType::F32, &Device::Cpu).unwrap(),
    );
    dnatune::model::checkpoint::save_safetensors(
        &tmp.path().join("model.safetensors"),
        &tensors,
        DType::F32,
    )
    .unwrap();
    let err = model::load_classifier(tmp.path(), None, &LoadOptions::default(), &Device::Cpu)
        .err()
        .expect("mis-shaped tensor accepted");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("bert.encoder.layer.1.intermediate.dense.weight") && msg.contains("[19, 12]"),
        "{msg}"
    );
}

#[test]
fn class_count_mismatch_with_checkpoint_head_is_an_error() {
    let opts = LoadOptions {
        num_labels: Some(5),
        ..LoadOptions::default()
    };
    let err = model::load_classifier(&fixture("tiny-dnabert2"), None, &opts, &Device::Cpu)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("classifier.weight"));
}

/// A linear layer with a LoRA adapter on the fused CPU path (frozen product with the bias inside,
/// 2-D inputs used without reshapes) equals the plain candle composition, for 2-D and 3-D
/// inputs, in values and in every gradient (input, LoRA A and B, and the weight and bias
/// themselves when they train).
#[test]
fn linear_layer_equals_the_plain_composition_for_2d_and_3d_inputs() {
    let dev = Device::Cpu;
    for trainable in [Trainable::All, Trainable::AdaptersAndHead] {
        for dims in [vec![6, 5], vec![2, 3, 5]] {
            let lora = LoraConfig {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                target_modules: vec!["Wqkv".into()],
            };
            let mut b = ParamBuilder::new(HashMap::new(), trainable, 3, Box::new(|_| true), &dev)
                .with_dtype(DType::F64)
                .with_lora(Some(lora));
            let layer = Linear::build(&mut b, "Wqkv", 5, 9, true, 0.5).unwrap();
            let (params, _) = b.finish().unwrap();
            let mut init = Initializer::new(4);
            let b_var = params.entries["Wqkv.lora_B.weight"].var.clone().unwrap();
            b_var.set(&normal_f64(&mut init, &[9, 2], 0.5)).unwrap();
            let x = Var::from_tensor(&normal_f64(&mut init, &dims, 1.0)).unwrap();
            let ctx = ForwardCtx::eval();
            let fused = layer.forward(&x, &ctx).unwrap();
            let plain = with_plain_kernels(|| layer.forward(&x, &ctx)).unwrap();
            let mut out_dims = dims.clone();
            *out_dims.last_mut().unwrap() = 9;
            assert_eq!(fused.dims(), out_dims.as_slice());
            assert!(max_tensor_diff(&fused, &plain) < 1e-12);
            let weights = normal_f64(&mut init, &out_dims, 1.0);
            let grads = |y: &Tensor| {
                (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let (g_fused, g_plain) = (grads(&fused), grads(&plain));
            let mut checked = vec![x.as_tensor().clone()];
            checked.extend(params.trainable().map(|(_, v)| v.as_tensor().clone()));
            assert!(checked.len() >= 3, "x, lora A and B at least");
            for t in &checked {
                let (a, b) = (g_fused.get(t).unwrap(), g_plain.get(t).unwrap());
                assert!(
                    max_tensor_diff(a, b) < 1e-12,
                    "{trainable:?} {dims:?}: gradients differ"
                );
            }
        }
    }
}
