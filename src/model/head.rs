//! How a trained classifier head summarises a sequence, recorded beside its weights.
//!
//! The pooler and classifier learn on one summary of the encoder's output (the [CLS] token or
//! the mean over tokens). Scoring them on the other still runs and still gives plausible
//! probabilities, only worse ones, so the choice travels with the model: training writes
//! `dnatune.json` into the best checkpoint (a model directory or a PEFT adapter, whose
//! `adapter_config.json` stays as PEFT reads it) and inference reads it back.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::Pooling;

/// The record's file name, in a model or adapter directory.
pub const HEAD_FILE: &str = "dnatune.json";

/// What inference must repeat of the head's training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeadRecord {
    pub pooling: Pooling,
}

/// Writes `record` into `dir` (atomically).
pub fn write_head_record(dir: &Path, record: HeadRecord) -> Result<()> {
    crate::fsutil::write_json_atomic(&dir.join(HEAD_FILE), &record)
}

/// The record in `dir`, or `None` for a directory written by another tool.
pub fn read_head_record(dir: &Path) -> Result<Option<HeadRecord>> {
    let path = dir.join(HEAD_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let record = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected {{\"pooling\": \"cls\" | \"mean\"}}",
            path.display()
        )
    })?;
    Ok(Some(record))
}

/// The pooling to score with: the one recorded where the head was saved (the adapter when there
/// is one, else the model), which an explicit `requested` may repeat but not contradict; without
/// a record, `requested` or [CLS].
pub fn inference_pooling(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    requested: Option<Pooling>,
) -> Result<Pooling> {
    let head_dir = adapter_dir.unwrap_or(model_dir);
    match (read_head_record(head_dir)?, requested) {
        (Some(record), Some(asked)) if record.pooling != asked => bail!(
            "{} says the head was trained on {} pooling, but --pooling {} was given; \
             drop --pooling to score it as it was trained",
            head_dir.join(HEAD_FILE).display(),
            record.pooling.name(),
            asked.name()
        ),
        (Some(record), _) => Ok(record.pooling),
        (None, asked) => Ok(asked.unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_decides_the_pooling() {
        let model = tempfile::tempdir().unwrap();
        let adapter = tempfile::tempdir().unwrap();
        // Nothing recorded: the request, else [CLS].
        assert_eq!(
            inference_pooling(model.path(), None, None).unwrap(),
            Pooling::Cls
        );
        assert_eq!(
            inference_pooling(model.path(), None, Some(Pooling::Mean)).unwrap(),
            Pooling::Mean
        );
        write_head_record(
            adapter.path(),
            HeadRecord {
                pooling: Pooling::Mean,
            },
        )
        .unwrap();
        assert_eq!(
            read_head_record(adapter.path()).unwrap(),
            Some(HeadRecord {
                pooling: Pooling::Mean
            })
        );
        // The adapter's record wins over a model without one, and may be repeated.
        for asked in [None, Some(Pooling::Mean)] {
            assert_eq!(
                inference_pooling(model.path(), Some(adapter.path()), asked).unwrap(),
                Pooling::Mean
            );
        }
        let err = inference_pooling(model.path(), Some(adapter.path()), Some(Pooling::Cls))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("trained on mean pooling") && err.contains("--pooling cls"),
            "{err}"
        );
        // The model directory's own record is read when no adapter is given.
        write_head_record(
            model.path(),
            HeadRecord {
                pooling: Pooling::Cls,
            },
        )
        .unwrap();
        assert_eq!(
            inference_pooling(model.path(), None, None).unwrap(),
            Pooling::Cls
        );
    }

    #[test]
    fn malformed_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(HEAD_FILE), "{\"pooling\": \"max\"}").unwrap();
        let err = format!("{:#}", read_head_record(dir.path()).unwrap_err());
        assert!(err.contains(HEAD_FILE) && err.contains("max"), "{err}");
    }
}
