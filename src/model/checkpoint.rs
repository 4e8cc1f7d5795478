//! Reading and writing Hugging Face-style weight files.
//!
//! A model directory holds its weights in one of the layouts `transformers` writes: a single
//! `model.safetensors`, safetensors shards listed by `model.safetensors.index.json`, or the older
//! `pytorch_model.bin` (possibly sharded too). Everything is loaded into one name -> tensor map with
//! floating tensors in F32, so model code never has to care which layout or precision it came from.
//! `pytorch_model.bin` is a pickle inside a zip; it is parsed by candle's pickle reader, which only
//! interprets the data structure and never runs code, so an untrusted checkpoint cannot execute
//! anything.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// How a directory stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// One `*.safetensors` file.
    Safetensors,
    /// Several safetensors files listed by `model.safetensors.index.json`.
    ShardedSafetensors,
    /// `pytorch_model.bin`, or its shards listed by `pytorch_model.bin.index.json`.
    PytorchBin,
}

const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const PYTORCH_BIN: &str = "pytorch_model.bin";
const PYTORCH_BIN_INDEX: &str = "pytorch_model.bin.index.json";
/// PEFT adapters live next to base weights but are not base weights.
const ADAPTER_SAFETENSORS: &str = "adapter_model.safetensors";

/// Finds the weight files of `dir`, in the order `transformers` prefers them: safetensors before
/// pickles, a single file before an index, and finally any one other `*.safetensors` file.
pub fn find_weight_files(dir: &Path) -> Result<(WeightFormat, Vec<PathBuf>)> {
    locate_weights(dir).map(|(format, files, _)| (format, files))
}

/// The weight files of `dir`, plus the shard index they came from, if any.
fn locate_weights(dir: &Path) -> Result<(WeightFormat, Vec<PathBuf>, Option<PathBuf>)> {
    if !dir.is_dir() {
        bail!(
            "model directory {} does not exist or is not a directory",
            dir.display()
        );
    }
    let single = dir.join(SAFETENSORS);
    if single.is_file() {
        return Ok((WeightFormat::Safetensors, vec![single], None));
    }
    let index = dir.join(SAFETENSORS_INDEX);
    if index.is_file() {
        return Ok((
            WeightFormat::ShardedSafetensors,
            shard_files(&index)?,
            Some(index),
        ));
    }
    let bin = dir.join(PYTORCH_BIN);
    if bin.is_file() {
        return Ok((WeightFormat::PytorchBin, vec![bin], None));
    }
    let bin_index = dir.join(PYTORCH_BIN_INDEX);
    if bin_index.is_file() {
        return Ok((
            WeightFormat::PytorchBin,
            shard_files(&bin_index)?,
            Some(bin_index),
        ));
    }
    let mut others = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let is_candidate = path.is_file()
            && path.extension().is_some_and(|e| e == "safetensors")
            && path.file_name().is_some_and(|n| n != ADAPTER_SAFETENSORS);
        if is_candidate {
            others.push(path);
        }
    }
    others.sort();
    match others.len() {
        1 => Ok((WeightFormat::Safetensors, others, None)),
        0 => bail!(
            "no model weights in {}: looked for {SAFETENSORS}, {SAFETENSORS_INDEX}, \
             {PYTORCH_BIN}, {PYTORCH_BIN_INDEX} or a single other *.safetensors file",
            dir.display()
        ),
        _ => bail!(
            "ambiguous model weights in {}: several *.safetensors files ({}) and no {SAFETENSORS_INDEX} \
             saying how they fit together",
            dir.display(),
            others
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The `weight_map` of a shard index: tensor name -> shard file name.
fn read_index(index: &Path) -> Result<BTreeMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let parsed: Index = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a valid shard index with a weight_map",
            index.display()
        )
    })?;
    if parsed.weight_map.is_empty() {
        bail!("{}: weight_map lists no tensors", index.display());
    }
    Ok(parsed.weight_map)
}

/// The distinct shard files an index names, each checked to exist.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<String> = read_index(index)?.into_values().collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            if Path::new(&name).components().count() != 1 {
                bail!(
                    "{}: shard name {name:?} is not a plain file name",
                    index.display()
                );
            }
            let path = dir.join(&name);
            if !path.is_file() {
                bail!("{}: shard {name} is listed but missing", index.display());
            }
            Ok(path)
        })
        .collect()
}

/// Loads every tensor of the model in `dir` onto `device`: floating tensors as F32, integer tensors
/// (e.g. `position_ids` buffers) unchanged, and a leading `module.` (left by `DataParallel`) removed.
pub fn load_weights(
    dir: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, WeightFormat)> {
    let (format, files, index) = locate_weights(dir)?;
    let mut tensors = HashMap::new();
    for file in &files {
        let part: Vec<(String, Tensor)> = match format {
            WeightFormat::Safetensors | WeightFormat::ShardedSafetensors => {
                candle_core::safetensors::load(file, device)
                    .with_context(|| format!("cannot read safetensors file {}", file.display()))?
                    .into_iter()
                    .collect()
            }
            WeightFormat::PytorchBin => read_pytorch_bin(file, device)?,
        };
        for (name, tensor) in part {
            let name = name
                .strip_prefix("module.")
                .map(str::to_owned)
                .unwrap_or(name);
            let tensor = if tensor.dtype().is_float() && tensor.dtype() != DType::F32 {
                tensor
                    .to_dtype(DType::F32)
                    .with_context(|| format!("{}: cannot convert {name} to f32", file.display()))?
            } else {
                tensor
            };
            check_finite(&tensor, &name, file)?;
            if tensors.insert(name.clone(), tensor).is_some() {
                bail!(
                    "{}: tensor {name} appears more than once in {}",
                    file.display(),
                    dir.display()
                );
            }
        }
    }
    if let Some(index) = index {
        check_index_complete(&index, &tensors)?;
    }
    Ok((tensors, format))
}

/// Guards against a truncated or mismatched shard: every tensor the index lists must have been read.
fn check_index_complete(index: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let absent: Vec<String> = read_index(index)?
        .into_iter()
        .filter(|(name, _)| {
            let stripped = name.strip_prefix("module.").unwrap_or(name);
            !tensors.contains_key(stripped)
        })
        .map(|(name, file)| format!("{name} (in {file})"))
        .collect();
    if !absent.is_empty() {
        bail!(
            "{}: {} tensor(s) listed in weight_map were not found in their shards: {}",
            index.display(),
            absent.len(),
            absent.join(", ")
        );
    }
    Ok(())
}

/// Keys under which training scripts commonly nest the state dict inside a larger checkpoint dict.
const NESTED_STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model_state_dict", "model"];

/// Reads a zip-format `torch.save` file without executing its pickle. A bare state dict is read
/// directly; otherwise the state dict is looked for under the usual nesting keys.
/// Refuses a floating tensor holding NaN or infinite values (a checkpoint saved after training
/// diverged, or a damaged file): loaded, it would turn every probability into NaN without an
/// error. One reduction per tensor; the values are counted only when it is not finite.
pub fn check_finite(tensor: &Tensor, name: &str, file: &Path) -> Result<()> {
    if !tensor.dtype().is_float() {
        return Ok(());
    }
    // Half-precision sums can overflow on finite values; f32 ones cannot for any real model.
    let wide = match tensor.dtype() {
        DType::F32 | DType::F64 => tensor.clone(),
        _ => tensor.to_dtype(DType::F32)?,
    };
    let sum = wide.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if sum.is_finite() {
        return Ok(());
    }
    let values = wide.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        bail!(
            "{}: tensor `{name}` has {bad} NaN or infinite values of {}; the checkpoint is \
             unusable (was it saved after training diverged?)",
            file.display(),
            values.len()
        );
    }
    Ok(())
}

fn read_pytorch_bin(file: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let context = || {
        format!(
            "cannot read PyTorch checkpoint {} (only the zip format of torch >= 1.6 is supported; \
             re-save it or convert it to safetensors)",
            file.display()
        )
    };
    let mut tensors = candle_core::pickle::read_all(file).with_context(context)?;
    if tensors.is_empty() {
        for key in NESTED_STATE_DICT_KEYS {
            // A missing key is an error inside candle; it only means "try the next key".
            if let Ok(found) = candle_core::pickle::read_all_with_key(file, Some(key)) {
                if !found.is_empty() {
                    tensors = found;
                    break;
                }
            }
        }
    }
    if tensors.is_empty() {
        bail!(
            "{}: no tensors found, neither at the top level nor under {}",
            file.display(),
            NESTED_STATE_DICT_KEYS.join(", ")
        );
    }
    tensors
        .into_iter()
        .map(|(name, t)| {
            let t = t
                .to_device(device)
                .with_context(|| format!("{}: cannot move {name} to device", file.display()))?;
            Ok((name, t))
        })
        .collect()
}

/// Adds `{prefix}.` to encoder keys (`embeddings.*`, `encoder.*`, `pooler.*`) that lack it, for
/// checkpoints saved from the bare encoder rather than the `...For*` wrapper. Head keys
/// (`classifier.*`, `cls.*`) and anything else are left as they are. `prefix` is given without
/// the dot, e.g. `"bert"`; a trailing dot is tolerated.
pub fn normalize_prefix(
    map: HashMap<String, Tensor>,
    prefix: &str,
) -> Result<HashMap<String, Tensor>> {
    let prefix = prefix.trim_end_matches('.');
    let mut out = HashMap::with_capacity(map.len());
    for (name, tensor) in map {
        let is_bare_encoder_key = ["embeddings.", "encoder.", "pooler."]
            .iter()
            .any(|p| name.starts_with(p));
        let name = if is_bare_encoder_key {
            format!("{prefix}.{name}")
        } else {
            name
        };
        if out.insert(name.clone(), tensor).is_some() {
            bail!("tensor {name} is present both with and without the {prefix:?} prefix");
        }
    }
    Ok(out)
}

/// Writes `tensors` to `path` as safetensors in `dtype` (F32 or F16), keys sorted, atomically. The
/// `format: pt` metadata is what `transformers` expects when it loads the file back.
pub fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16) {
        bail!(
            "cannot save {}: weights are written as f32 or f16, not {dtype:?}",
            path.display()
        );
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut prepared = Vec::with_capacity(names.len());
    for name in names {
        let tensor = &tensors[name];
        let tensor = if tensor.dtype().is_float() {
            tensor.to_dtype(dtype)
        } else {
            Ok(tensor.clone())
        };
        let tensor = tensor
            .and_then(|t| t.to_device(&Device::Cpu))
            .and_then(|t| t.contiguous())
            .with_context(|| format!("cannot prepare {name} for {}", path.display()))?;
        prepared.push((name.as_str(), tensor));
    }
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let bytes = safetensors::serialize(prepared.iter().map(|(n, t)| (*n, t)), Some(metadata))
        .with_context(|| format!("cannot serialise weights for {}", path.display()))?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// How a loaded checkpoint differs from what the model expects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightReport {
    /// Expected by the model, absent from the checkpoint (sorted).
    pub missing: Vec<String>,
    /// In the checkpoint, unknown to the model (sorted).
    pub unexpected: Vec<String>,
    /// Present in both with different shapes: name, expected shape, found shape (sorted by name).
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

/// Compares the checkpoint's tensors with the names and shapes the model expects.
pub fn compare_shapes(
    expected: &[(String, Vec<usize>)],
    found: &HashMap<String, Tensor>,
) -> WeightReport {
    let mut report = WeightReport::default();
    for (name, shape) in expected {
        match found.get(name) {
            None => report.missing.push(name.clone()),
            Some(t) if t.dims() != shape.as_slice() => {
                report
                    .mismatched
                    .push((name.clone(), shape.clone(), t.dims().to_vec()))
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    report.unexpected = found
        .keys()
        .filter(|n| !known.contains(n.as_str()))
        .cloned()
        .collect();
    report.missing.sort();
    report.unexpected.sort();
    report.mismatched.sort();
    report
}

impl WeightReport {
    /// True when names and shapes match exactly.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// Fails on any shape mismatch, which always means the wrong config or the wrong checkpoint.
    /// Missing and unexpected names are left to the caller: a fresh task head is legitimately missing.
    pub fn ensure_no_mismatch(&self, dir: &Path) -> Result<()> {
        if self.mismatched.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = self
            .mismatched
            .iter()
            .map(|(name, want, got)| {
                format!("  {name}: model expects {want:?}, checkpoint has {got:?}")
            })
            .collect();
        bail!(
            "weights in {} do not fit the model config ({} tensor(s) with the wrong shape):\n{}",
            dir.display(),
            lines.len(),
            lines.join("\n")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    /// A temporary model directory holding copies of the named fixture files.
    fn copy_fixture(name: &str, files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for file in files {
            std::fs::copy(fixture(name).join(file), dir.path().join(file)).unwrap();
        }
        dir
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn sorted_names(map: &HashMap<String, Tensor>) -> Vec<String> {
        let mut names: Vec<String> = map.keys().cloned().collect();
        names.sort();
        names
    }

    fn assert_same_tensors(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
        assert_eq!(sorted_names(a), sorted_names(b));
        for (name, t) in a {
            assert_eq!(t.dims(), b[name].dims(), "{name}");
            assert_eq!(values(t), values(&b[name]), "{name}");
        }
    }

    /// The names and shapes a DNABERT-2 classifier needs, derived from config.json alone.
    fn dnabert2_expected_shapes(config: &serde_json::Value) -> Vec<(String, Vec<usize>)> {
        let get = |k: &str| config[k].as_u64().unwrap() as usize;
        let (h, inter, layers) = (
            get("hidden_size"),
            get("intermediate_size"),
            get("num_hidden_layers"),
        );
        let labels = config["id2label"].as_object().unwrap().len();
        let mut shapes = vec![
            (
                "bert.embeddings.word_embeddings.weight".to_owned(),
                vec![get("vocab_size"), h],
            ),
            (
                "bert.embeddings.token_type_embeddings.weight".to_owned(),
                vec![get("type_vocab_size"), h],
            ),
            ("bert.embeddings.LayerNorm.weight".to_owned(), vec![h]),
            ("bert.embeddings.LayerNorm.bias".to_owned(), vec![h]),
            ("bert.pooler.dense.weight".to_owned(), vec![h, h]),
            ("bert.pooler.dense.bias".to_owned(), vec![h]),
            ("classifier.weight".to_owned(), vec![labels, h]),
            ("classifier.bias".to_owned(), vec![labels]),
        ];
        for i in 0..layers {
            let p = format!("bert.encoder.layer.{i}.");
            for (suffix, shape) in [
                ("attention.self.Wqkv.weight", vec![3 * h, h]),
                ("attention.self.Wqkv.bias", vec![3 * h]),
                ("attention.output.dense.weight", vec![h, h]),
                ("attention.output.dense.bias", vec![h]),
                ("attention.output.LayerNorm.weight", vec![h]),
                ("attention.output.LayerNorm.bias", vec![h]),
                ("mlp.gated_layers.weight", vec![2 * inter, h]),
                ("mlp.wo.weight", vec![h, inter]),
                ("mlp.wo.bias", vec![h]),
                ("mlp.layernorm.weight", vec![h]),
                ("mlp.layernorm.bias", vec![h]),
            ] {
                shapes.push((format!("{p}{suffix}"), shape));
            }
        }
        shapes
    }

    fn tiny_dnabert2() -> HashMap<String, Tensor> {
        load_weights(&fixture("tiny-dnabert2"), &Device::Cpu)
            .unwrap()
            .0
    }

    #[test]
    fn safetensors_and_pytorch_bin_hold_the_same_weights() {
        let st_dir = copy_fixture("tiny-dnabert2", &["model.safetensors"]);
        let bin_dir = copy_fixture("tiny-dnabert2", &["pytorch_model.bin"]);
        let (from_st, st_format) = load_weights(st_dir.path(), &Device::Cpu).unwrap();
        let (from_bin, bin_format) = load_weights(bin_dir.path(), &Device::Cpu).unwrap();
        assert_eq!(st_format, WeightFormat::Safetensors);
        assert_eq!(bin_format, WeightFormat::PytorchBin);
        assert_eq!(from_st.len(), 30);
        assert!(from_st.values().all(|t| t.dtype() == DType::F32));
        assert_same_tensors(&from_st, &from_bin);
    }

    #[test]
    fn tiny_bert_fixture_files_agree_and_carry_position_embeddings() {
        let bin_dir = copy_fixture("tiny-bert", &["pytorch_model.bin"]);
        let (from_st, _) = load_weights(&fixture("tiny-bert"), &Device::Cpu).unwrap();
        let (from_bin, _) = load_weights(bin_dir.path(), &Device::Cpu).unwrap();
        assert_same_tensors(&from_st, &from_bin);
        let vocab = std::fs::read_to_string(fixture("tiny-bert/vocab.txt")).unwrap();
        let expected = [
            (
                "bert.embeddings.word_embeddings.weight".to_owned(),
                vec![vocab.lines().count(), 32],
            ),
            (
                "bert.embeddings.position_embeddings.weight".to_owned(),
                vec![64, 32],
            ),
            (
                "bert.encoder.layer.1.intermediate.dense.weight".to_owned(),
                vec![64, 32],
            ),
            ("classifier.weight".to_owned(), vec![2, 32]),
        ];
        let report = compare_shapes(&expected, &from_st);
        assert!(
            report.missing.is_empty() && report.mismatched.is_empty(),
            "{report:?}"
        );
        assert_eq!(report.unexpected.len(), from_st.len() - expected.len());
    }

    /// A NaN or an infinity anywhere in the weights is refused, naming the tensor and the count;
    /// large finite half-precision values, whose half-precision sum would overflow, are not.
    #[test]
    fn weights_with_non_finite_values_are_refused_by_name() {
        let mut weights = tiny_dnabert2();
        let large = Tensor::full(60_000f32, 64, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        weights.insert("cls.predictions.bias".to_owned(), large);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&weights, &file).unwrap();
        load_weights(dir.path(), &Device::Cpu).unwrap();
        let name = "bert.encoder.layer.0.mlp.wo.weight";
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut values = values(&weights[name]);
            values[7] = bad;
            let shape = weights[name].dims().to_vec();
            let mut poisoned = weights.clone();
            poisoned.insert(
                name.to_owned(),
                Tensor::from_vec(values, shape, &Device::Cpu).unwrap(),
            );
            candle_core::safetensors::save(&poisoned, &file).unwrap();
            let err = format!("{:#}", load_weights(dir.path(), &Device::Cpu).unwrap_err());
            assert!(
                err.contains(name) && err.contains("has 1 NaN or infinite values"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn safetensors_is_preferred_over_pytorch_bin() {
        let (format, files) = find_weight_files(&fixture("tiny-dnabert2")).unwrap();
        assert_eq!(format, WeightFormat::Safetensors);
        assert_eq!(
            files,
            vec![fixture("tiny-dnabert2").join("model.safetensors")]
        );
    }

    #[test]
    fn fixture_shapes_follow_config() {
        let text = std::fs::read_to_string(fixture("tiny-dnabert2/config.json")).unwrap();
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        let report = compare_shapes(&dnabert2_expected_shapes(&config), &tiny_dnabert2());
        assert!(report.is_clean(), "{report:?}");
        report
            .ensure_no_mismatch(&fixture("tiny-dnabert2"))
            .unwrap();
    }

    #[test]
    fn compare_shapes_names_mismatched_missing_and_unexpected_tensors() {
        let mut weights = tiny_dnabert2();
        let wqkv = "bert.encoder.layer.1.attention.self.Wqkv.weight";
        weights.insert(
            wqkv.to_owned(),
            Tensor::zeros((100, 48), DType::F32, &Device::Cpu).unwrap(),
        );
        weights.remove("classifier.bias");
        let extra = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        weights.insert("cls.predictions.bias".to_owned(), extra);
        let dir = tempfile::tempdir().unwrap();
        save_safetensors(&dir.path().join("model.safetensors"), &weights, DType::F32).unwrap();
        let (edited, _) = load_weights(dir.path(), &Device::Cpu).unwrap();

        let text = std::fs::read_to_string(fixture("tiny-dnabert2/config.json")).unwrap();
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        let report = compare_shapes(&dnabert2_expected_shapes(&config), &edited);
        assert!(!report.is_clean());
        assert_eq!(report.missing, vec!["classifier.bias".to_owned()]);
        assert_eq!(report.unexpected, vec!["cls.predictions.bias".to_owned()]);
        assert_eq!(
            report.mismatched,
            vec![(wqkv.to_owned(), vec![144, 48], vec![100, 48])]
        );
        let err = report
            .ensure_no_mismatch(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains(wqkv), "{err}");
        assert!(
            err.contains("[144, 48]") && err.contains("[100, 48]"),
            "{err}"
        );
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn only_missing_or_unexpected_names_pass_ensure_no_mismatch() {
        let expected = vec![("a".to_owned(), vec![2]), ("b".to_owned(), vec![3])];
        let found = HashMap::from([
            (
                "a".to_owned(),
                Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "c".to_owned(),
                Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
            ),
        ]);
        let report = compare_shapes(&expected, &found);
        assert_eq!(report.missing, vec!["b".to_owned()]);
        assert_eq!(report.unexpected, vec!["c".to_owned()]);
        assert!(report.mismatched.is_empty() && !report.is_clean());
        report.ensure_no_mismatch(Path::new("m")).unwrap();
    }

    #[test]
    fn f32_round_trip_is_exact_and_keeps_integers() {
        let mut weights = tiny_dnabert2();
        let ids = Tensor::arange(0i64, 7, &Device::Cpu).unwrap();
        weights.insert("bert.embeddings.position_ids".to_owned(), ids);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save_safetensors(&path, &weights, DType::F32).unwrap();
        let (back, _) = load_weights(dir.path(), &Device::Cpu).unwrap();
        let ids = &back["bert.embeddings.position_ids"];
        assert_eq!(ids.dtype(), DType::I64);
        assert_eq!(ids.to_vec1::<i64>().unwrap(), (0..7).collect::<Vec<i64>>());
        weights.remove("bert.embeddings.position_ids");
        let mut back = back;
        back.remove("bert.embeddings.position_ids");
        assert_same_tensors(&weights, &back);

        // transformers refuses safetensors files without this metadata.
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 1, "temporary file left behind");
    }

    #[test]
    fn f16_round_trip_is_within_half_precision() {
        let weights = tiny_dnabert2();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save_safetensors(&path, &weights, DType::F16).unwrap();
        let raw = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert!(raw.values().all(|t| t.dtype() == DType::F16));
        let (back, _) = load_weights(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(sorted_names(&weights), sorted_names(&back));
        let mut any_rounded = false;
        for (name, t) in &weights {
            assert_eq!(back[name].dtype(), DType::F32);
            for (x, y) in values(t).into_iter().zip(values(&back[name])) {
                // f16 keeps 11 significant bits: relative error at most 2^-11 in the normal range.
                assert!(
                    (x - y).abs() <= x.abs() * 2f32.powi(-11) + 1e-7,
                    "{name}: {x} vs {y}"
                );
                any_rounded |= x != y;
            }
        }
        assert!(
            any_rounded,
            "nothing was rounded: the file was not written as f16"
        );
    }

    #[test]
    fn save_rejects_other_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let err = save_safetensors(
            &dir.path().join("w.safetensors"),
            &tiny_dnabert2(),
            DType::BF16,
        );
        assert!(err.unwrap_err().to_string().contains("f32 or f16"));
    }

    /// Writes `weights` as two shards plus `model.safetensors.index.json`, optionally leaving one
    /// listed tensor out of its shard.
    fn write_shards(dir: &Path, weights: &HashMap<String, Tensor>, drop_from_shards: Option<&str>) {
        let mut first = HashMap::new();
        let mut second = HashMap::new();
        let mut weight_map = BTreeMap::new();
        for (name, t) in weights {
            let shard = if name.contains("layer.1") || name.starts_with("classifier") {
                "model-00002-of-00002.safetensors"
            } else {
                "model-00001-of-00002.safetensors"
            };
            weight_map.insert(name.clone(), shard.to_owned());
            if Some(name.as_str()) == drop_from_shards {
                continue;
            }
            let target = if shard.starts_with("model-00001") {
                &mut first
            } else {
                &mut second
            };
            target.insert(name.clone(), t.clone());
        }
        save_safetensors(
            &dir.join("model-00001-of-00002.safetensors"),
            &first,
            DType::F32,
        )
        .unwrap();
        save_safetensors(
            &dir.join("model-00002-of-00002.safetensors"),
            &second,
            DType::F32,
        )
        .unwrap();
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join(SAFETENSORS_INDEX), index.to_string()).unwrap();
    }

    #[test]
    fn sharded_safetensors_load_like_the_single_file() {
        let weights = tiny_dnabert2();
        let dir = tempfile::tempdir().unwrap();
        write_shards(dir.path(), &weights, None);
        let (format, files) = find_weight_files(dir.path()).unwrap();
        assert_eq!(format, WeightFormat::ShardedSafetensors);
        assert_eq!(files.len(), 2);
        let (sharded, format) = load_weights(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(format, WeightFormat::ShardedSafetensors);
        assert_same_tensors(&weights, &sharded);
    }

    #[test]
    fn a_tensor_missing_from_its_shard_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_shards(dir.path(), &tiny_dnabert2(), Some("classifier.weight"));
        let err = load_weights(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("classifier.weight") && err.contains(SAFETENSORS_INDEX),
            "{err}"
        );
    }

    #[test]
    fn a_shard_missing_from_disk_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_shards(dir.path(), &tiny_dnabert2(), None);
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let err = find_weight_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    }

    #[test]
    fn directory_without_weights_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join(ADAPTER_SAFETENSORS), b"not base weights").unwrap();
        let err = load_weights(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(
            err.contains("model.safetensors") && err.contains("pytorch_model.bin"),
            "{err}"
        );

        let gone = dir.path().join("nope");
        let err = find_weight_files(&gone).unwrap_err().to_string();
        assert!(err.contains(&gone.display().to_string()), "{err}");
    }

    #[test]
    fn a_single_other_safetensors_file_is_used_and_two_are_ambiguous() {
        let dir = copy_fixture("tiny-dnabert2", &[]);
        std::fs::copy(
            fixture("tiny-dnabert2/model.safetensors"),
            dir.path().join("weights.safetensors"),
        )
        .unwrap();
        let (format, files) = find_weight_files(dir.path()).unwrap();
        assert_eq!(format, WeightFormat::Safetensors);
        assert_eq!(files, vec![dir.path().join("weights.safetensors")]);

        std::fs::copy(
            fixture("tiny-dnabert2/model.safetensors"),
            dir.path().join("other.safetensors"),
        )
        .unwrap();
        let err = find_weight_files(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("other.safetensors") && err.contains("weights.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn nested_state_dict_with_module_prefix_is_read() {
        let (weights, format) = load_weights(&fixture("nested-state-dict"), &Device::Cpu).unwrap();
        assert_eq!(format, WeightFormat::PytorchBin);
        assert_eq!(
            sorted_names(&weights),
            vec![
                "bert.embeddings.position_ids",
                "bert.embeddings.word_embeddings.weight"
            ]
        );
        let word = &weights["bert.embeddings.word_embeddings.weight"];
        assert_eq!(word.dtype(), DType::F32, "f16 must be widened");
        assert_eq!(word.dims(), &[3, 4]);
        assert_eq!(
            values(word),
            (0..12).map(|i| i as f32 / 8.0).collect::<Vec<_>>()
        );
        let ids = &weights["bert.embeddings.position_ids"];
        assert_eq!(ids.dtype(), DType::I64);
        assert_eq!(ids.to_vec1::<i64>().unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_non_zip_pytorch_file_gives_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PYTORCH_BIN), b"\x80\x02legacy pickle").unwrap();
        let err = format!("{:#}", load_weights(dir.path(), &Device::Cpu).unwrap_err());
        assert!(
            err.contains("pytorch_model.bin") && err.contains("zip format"),
            "{err}"
        );
    }

    #[test]
    fn normalize_prefix_adds_bert_to_bare_encoder_keys_only() {
        let original = tiny_dnabert2();
        let bare: HashMap<String, Tensor> = original
            .iter()
            .map(|(k, t)| (k.strip_prefix("bert.").unwrap_or(k).to_owned(), t.clone()))
            .collect();
        assert!(bare.contains_key("encoder.layer.0.mlp.wo.weight"));
        let mut bare = bare;
        let cls = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        bare.insert("cls.predictions.bias".to_owned(), cls);
        let fixed = normalize_prefix(bare, "bert").unwrap();
        let mut want = sorted_names(&original);
        want.push("cls.predictions.bias".to_owned());
        want.sort();
        assert_eq!(sorted_names(&fixed), want);
        // Already-prefixed maps are unchanged, with or without a trailing dot on the prefix.
        assert_eq!(
            sorted_names(&normalize_prefix(original.clone(), "bert.").unwrap()),
            sorted_names(&original)
        );

        let mut clash = original;
        let t = clash["bert.pooler.dense.bias"].clone();
        clash.insert("pooler.dense.bias".to_owned(), t);
        let err = normalize_prefix(clash, "bert").unwrap_err().to_string();
        assert!(err.contains("bert.pooler.dense.bias"), "{err}");
    }
}
