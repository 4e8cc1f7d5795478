//! What a fine-tuned checkpoint must be scored with, recorded beside its weights.
//!
//! A head learns on one summary of the encoder's output (the [CLS] token or the mean over
//! tokens), at one token limit, over a frozen base held in one precision (f32, bf16, or quantized
//! under QLoRA). Scoring it any other way still runs and still gives plausible probabilities, only
//! not the ones the run reported. So training writes `dnatune.json` into the best checkpoint (a
//! model directory, or a PEFT adapter whose `adapter_config.json` stays as PEFT reads it) and
//! inference takes its settings from there unless the command line says otherwise.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::Pooling;
use crate::peft::bf16::Precision;
use crate::peft::quant::QuantKind;

/// The record's file name, in a model or adapter directory.
pub const RECORD_FILE: &str = "dnatune.json";

/// The token limit for checkpoints that record none (other tools' models, older dnatune runs).
pub const DEFAULT_MAX_LENGTH: usize = 128;

/// What inference should repeat of the checkpoint's training. Every field but `pooling` was added
/// later and reads as its default when an older record lacks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointRecord {
    pub pooling: Pooling,
    /// Tokens per sequence, [CLS] and [SEP] included.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// QLoRA's quantization of the frozen base under the adapter.
    #[serde(default)]
    pub quantize: Option<QuantKind>,
    /// The frozen base's precision under the adapter when not quantized.
    #[serde(default)]
    pub precision: Precision,
    /// Whether the run scored dev and test as the mean of both strands' probabilities.
    #[serde(default)]
    pub average_strands: bool,
}

/// Writes `record` into `dir` (atomically).
pub fn write_record(dir: &Path, record: &CheckpointRecord) -> Result<()> {
    crate::fsutil::write_json_atomic(&dir.join(RECORD_FILE), record)
}

/// The record in `dir`, or `None` for a directory written by another tool.
pub fn read_record(dir: &Path) -> Result<Option<CheckpointRecord>> {
    let path = dir.join(RECORD_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let record: CheckpointRecord = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected {{\"pooling\": \"cls\" | \"mean\", \"max_length\": N, \
             \"quantize\": null | \"int8\" | \"nf4\", \"precision\": \"f32\" | \"bf16\", \
             \"average_strands\": true | false}}",
            path.display()
        )
    })?;
    if record.max_length.is_some_and(|n| n < 3) {
        bail!(
            "{}: max_length must be at least 3 ([CLS], one token, [SEP])",
            path.display()
        );
    }
    Ok(Some(record))
}

/// The settings a command line gave explicitly (`None` where it left them to the record).
#[derive(Clone, Copy, Debug, Default)]
pub struct Requested {
    pub pooling: Option<Pooling>,
    pub max_length: Option<usize>,
    pub quantize: Option<QuantKind>,
    pub precision: Option<Precision>,
}

/// The settings to score a checkpoint with.
#[derive(Clone, Debug, PartialEq)]
pub struct InferenceSettings {
    pub pooling: Pooling,
    pub max_length: usize,
    pub quantize: Option<QuantKind>,
    pub precision: Precision,
    /// The record they were taken from, where there is one, and its file.
    pub record: Option<(PathBuf, CheckpointRecord)>,
}

impl InferenceSettings {
    /// One line saying what the record decided, for stderr; `None` without a record.
    pub fn describe_recorded(&self) -> Option<String> {
        let (path, _) = self.record.as_ref()?;
        let base = match self.quantize {
            Some(kind) => format!("{kind}-quantized base"),
            None => format!("{} base", self.precision),
        };
        Some(format!(
            "scoring with {} pooling, max length {}, {base} (from {} unless given)",
            self.pooling.name(),
            self.max_length,
            path.display()
        ))
    }

    /// Whether the run behind the record averaged both strands.
    pub fn trained_on_both_strands(&self) -> bool {
        self.record.as_ref().is_some_and(|(_, r)| r.average_strands)
    }
}

/// The settings for scoring the head saved in `adapter_dir` (when there is an adapter) or
/// `model_dir`: the explicitly requested ones, else the recorded ones, else the defaults
/// (cls, [`DEFAULT_MAX_LENGTH`], f32). A requested pooling may repeat the record but not
/// contradict it: scoring on the other summary is never what a user means. The token limit
/// and the base's precision may be changed on purpose (longer inputs, a cheaper base), so an
/// explicit value simply wins; an explicit `precision` also drops a recorded quantization.
pub fn inference_settings(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    requested: Requested,
) -> Result<InferenceSettings> {
    let head_dir = adapter_dir.unwrap_or(model_dir);
    let record = read_record(head_dir)?;
    let pooling = match (&record, requested.pooling) {
        (Some(record), Some(asked)) if record.pooling != asked => bail!(
            "{} says the head was trained on {} pooling, but --pooling {} was given; \
             drop --pooling to score it as it was trained",
            head_dir.join(RECORD_FILE).display(),
            record.pooling.name(),
            asked.name()
        ),
        (Some(record), _) => record.pooling,
        (None, asked) => asked.unwrap_or_default(),
    };
    let max_length = requested
        .max_length
        .or(record.and_then(|r| r.max_length))
        .unwrap_or(DEFAULT_MAX_LENGTH);
    let (quantize, precision) = match (requested.quantize, requested.precision) {
        (Some(kind), _) => (Some(kind), Precision::F32),
        (None, Some(precision)) => (None, precision),
        (None, None) => record.map_or((None, Precision::F32), |r| (r.quantize, r.precision)),
    };
    Ok(InferenceSettings {
        pooling,
        max_length,
        quantize,
        precision,
        record: record.map(|r| (head_dir.join(RECORD_FILE), r)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of the head's pooling alone, as dnatune wrote before the record grew.
    fn pooling_only(pooling: Pooling) -> CheckpointRecord {
        CheckpointRecord {
            pooling,
            max_length: None,
            quantize: None,
            precision: Precision::F32,
            average_strands: false,
        }
    }

    fn asked_pooling(pooling: Option<Pooling>) -> Requested {
        Requested {
            pooling,
            ..Requested::default()
        }
    }

    #[test]
    fn pooling_comes_from_the_record_and_may_be_repeated_not_contradicted() {
        let model = tempfile::tempdir().unwrap();
        let adapter = tempfile::tempdir().unwrap();
        let pooling = |adapter_dir: Option<&Path>, asked| {
            inference_settings(model.path(), adapter_dir, asked_pooling(asked)).map(|s| s.pooling)
        };
        // Nothing recorded: the request, else [CLS].
        assert_eq!(pooling(None, None).unwrap(), Pooling::Cls);
        assert_eq!(pooling(None, Some(Pooling::Mean)).unwrap(), Pooling::Mean);
        let record = pooling_only(Pooling::Mean);
        write_record(adapter.path(), &record).unwrap();
        assert_eq!(read_record(adapter.path()).unwrap(), Some(record));
        // The adapter's record wins over a model without one, and may be repeated.
        for asked in [None, Some(Pooling::Mean)] {
            assert_eq!(pooling(Some(adapter.path()), asked).unwrap(), Pooling::Mean);
        }
        let err = pooling(Some(adapter.path()), Some(Pooling::Cls))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("trained on mean pooling") && err.contains("--pooling cls"),
            "{err}"
        );
        // The model directory's own record is read when no adapter is given.
        write_record(model.path(), &pooling_only(Pooling::Cls)).unwrap();
        assert_eq!(pooling(None, None).unwrap(), Pooling::Cls);
    }

    #[test]
    fn length_and_base_come_from_the_record_unless_given() {
        let dir = tempfile::tempdir().unwrap();
        let settings = |requested| inference_settings(dir.path(), None, requested).unwrap();
        let defaults = settings(Requested::default());
        assert_eq!(
            (defaults.max_length, defaults.quantize, defaults.precision),
            (DEFAULT_MAX_LENGTH, None, Precision::F32)
        );
        assert_eq!(defaults.describe_recorded(), None);
        let record = CheckpointRecord {
            pooling: Pooling::Mean,
            max_length: Some(40),
            quantize: Some(QuantKind::Nf4),
            precision: Precision::F32,
            average_strands: true,
        };
        write_record(dir.path(), &record).unwrap();
        let recorded = settings(Requested::default());
        assert_eq!(
            (recorded.max_length, recorded.quantize, recorded.precision),
            (40, Some(QuantKind::Nf4), Precision::F32)
        );
        assert!(recorded.trained_on_both_strands());
        let line = recorded.describe_recorded().unwrap();
        assert!(
            line.contains("mean pooling, max length 40, nf4-quantized base")
                && line.contains(RECORD_FILE),
            "{line}"
        );
        // Explicit values win: a length, another quantization, or a precision (which drops the
        // recorded quantization).
        let given = settings(Requested {
            max_length: Some(90),
            quantize: Some(QuantKind::Int8),
            ..Requested::default()
        });
        assert_eq!(
            (given.max_length, given.quantize),
            (90, Some(QuantKind::Int8))
        );
        let given = settings(Requested {
            precision: Some(Precision::Bf16),
            ..Requested::default()
        });
        assert_eq!((given.quantize, given.precision), (None, Precision::Bf16));
    }

    #[test]
    fn a_record_of_pooling_alone_reads_with_defaults() {
        // What dnatune wrote before the record grew.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RECORD_FILE), "{\"pooling\": \"mean\"}").unwrap();
        let record = read_record(dir.path()).unwrap().unwrap();
        assert_eq!(record, pooling_only(Pooling::Mean));
        let settings = inference_settings(dir.path(), None, Requested::default()).unwrap();
        assert_eq!(settings.max_length, DEFAULT_MAX_LENGTH);
        assert!(!settings.trained_on_both_strands());
    }

    #[test]
    fn malformed_records_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for (text, expected) in [
            ("{\"pooling\": \"max\"}", "max"),
            ("{\"pooling\": \"cls\", \"max_length\": 2}", "at least 3"),
            ("{\"pooling\": \"cls\", \"quantize\": \"int4\"}", "int4"),
        ] {
            std::fs::write(dir.path().join(RECORD_FILE), text).unwrap();
            let err = format!("{:#}", read_record(dir.path()).unwrap_err());
            assert!(err.contains(RECORD_FILE) && err.contains(expected), "{err}");
        }
    }
}
