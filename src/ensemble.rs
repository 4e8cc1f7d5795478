//! Ensembles of fine-tuned models: the class probabilities of several members averaged per
//! sequence. The seeds of a `--seeds` run (or the folds of a `--folds` run) are models of the same
//! data that err on different sequences; their mean calls more of them right than a typical
//! member does, at one forward pass per member.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::model::config::ModelConfig;

/// One fine-tuned model of the ensemble's base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Member {
    /// A PEFT adapter, applied on the base model.
    Adapter(PathBuf),
    /// A full model directory (full fine-tuning's checkpoint).
    Model(PathBuf),
}

impl Member {
    pub fn dir(&self) -> &Path {
        match self {
            Member::Adapter(dir) | Member::Model(dir) => dir,
        }
    }
}

/// The members named by `dirs`, in order: a checkpoint directory (an adapter or a model) is one
/// member; a run directory of `--seeds` or `--folds` stands for the `best` checkpoint of each of
/// its `seed-N` / `fold-N` runs, in order of N.
pub fn resolve_members(dirs: &[PathBuf]) -> Result<Vec<Member>> {
    let mut members = Vec::new();
    for dir in dirs {
        if let Some(member) = checkpoint(dir) {
            members.push(member);
            continue;
        }
        let runs = repeated_runs(dir)?;
        if runs.is_empty() {
            bail!(
                "{} is neither a checkpoint (adapter_config.json or config.json) nor a run \
                 directory with seed-N or fold-N runs",
                dir.display()
            );
        }
        for run in runs {
            let best = run.join("best");
            members.push(checkpoint(&best).with_context(|| {
                format!(
                    "{} has no best checkpoint (an unfinished run? `dnatune train --resume {}`)",
                    run.display(),
                    run.display()
                )
            })?);
        }
    }
    ensure!(!members.is_empty(), "the ensemble has no members");
    Ok(members)
}

fn checkpoint(dir: &Path) -> Option<Member> {
    if dir.join("adapter_config.json").is_file() {
        Some(Member::Adapter(dir.to_path_buf()))
    } else if dir.join("config.json").is_file() {
        Some(Member::Model(dir.to_path_buf()))
    } else {
        None
    }
}

/// `dir`'s `seed-N` and `fold-N` subdirectories, ordered by kind and then N.
fn repeated_runs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut runs = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let numbered = ["seed-", "fold-"].into_iter().find_map(|prefix| {
            let n = name.strip_prefix(prefix)?.parse::<u64>().ok()?;
            Some((prefix, n))
        });
        if let Some(key) = numbered {
            if entry.path().is_dir() {
                runs.push((key, entry.path()));
            }
        }
    }
    runs.sort();
    Ok(runs.into_iter().map(|(_, path)| path).collect())
}

/// Refuses a full-model member whose encoder is not shaped like the base's: such a member was
/// fine-tuned from another model, which the ensemble's `--model` would not describe.
pub fn check_member_shape(base: &Path, member: &Path) -> Result<()> {
    let none: [&str; 0] = [];
    let (base_cfg, _) = ModelConfig::from_dir(base, none)?;
    let (member_cfg, _) = ModelConfig::from_dir(member, none)?;
    let shape = |c: &ModelConfig| {
        (
            c.architecture,
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
        )
    };
    ensure!(
        shape(&base_cfg) == shape(&member_cfg),
        "{} is not a fine-tune of {}: (architecture, vocabulary, hidden, layers, heads, \
         intermediate) {:?} against {:?}",
        member.display(),
        base.display(),
        shape(&member_cfg),
        shape(&base_cfg)
    );
    Ok(())
}

/// The running mean of the members' class probabilities (row-major N x C), summed in f64.
pub struct ProbabilityMean {
    sum: Vec<f64>,
    classes: usize,
    members: usize,
}

impl ProbabilityMean {
    pub fn new() -> Self {
        ProbabilityMean {
            sum: Vec::new(),
            classes: 0,
            members: 0,
        }
    }

    /// Adds one member's probabilities; `member` names it in errors.
    pub fn add(&mut self, probs: &[f32], classes: usize, member: &Path) -> Result<()> {
        if self.members == 0 {
            self.sum = vec![0.0; probs.len()];
            self.classes = classes;
        }
        ensure!(
            classes == self.classes,
            "{} has {classes} classes but the ensemble's first member has {}",
            member.display(),
            self.classes
        );
        ensure!(
            probs.len() == self.sum.len(),
            "{} scored {} values, the first member {}",
            member.display(),
            probs.len(),
            self.sum.len()
        );
        for (s, &p) in self.sum.iter_mut().zip(probs) {
            *s += f64::from(p);
        }
        self.members += 1;
        Ok(())
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The mean over the members added (at least one).
    pub fn finish(self) -> Vec<f32> {
        let n = self.members.max(1) as f64;
        self.sum.iter().map(|s| (s / n) as f32).collect()
    }
}

impl Default for ProbabilityMean {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkdir_with(dir: &Path, file: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(file), "{}").unwrap();
    }

    #[test]
    fn run_directories_expand_to_their_best_checkpoints_in_numeric_order() {
        let tmp = tempfile::tempdir().unwrap();
        let seeds = tmp.path().join("seeds");
        for n in [10, 2, 1] {
            mkdir_with(&seeds.join(format!("seed-{n}/best")), "adapter_config.json");
        }
        // Other entries of a run directory are not members.
        mkdir_with(&seeds.join("seed-x"), "config.json");
        std::fs::write(seeds.join("seed-3"), "a file, not a run").unwrap();
        let single = tmp.path().join("full/best");
        mkdir_with(&single, "config.json");
        let members = resolve_members(&[seeds.clone(), single.clone()]).unwrap();
        let expected = vec![
            Member::Adapter(seeds.join("seed-1/best")),
            Member::Adapter(seeds.join("seed-2/best")),
            Member::Adapter(seeds.join("seed-10/best")),
            Member::Model(single),
        ];
        assert_eq!(members, expected);
    }

    #[test]
    fn unfinished_runs_and_empty_directories_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let folds = tmp.path().join("cv");
        mkdir_with(&folds.join("fold-1/best"), "config.json");
        std::fs::create_dir_all(folds.join("fold-2")).unwrap();
        let err = format!(
            "{:#}",
            resolve_members(std::slice::from_ref(&folds)).unwrap_err()
        );
        assert!(err.contains("fold-2 has no best checkpoint"), "{err}");
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = format!("{:#}", resolve_members(&[empty]).unwrap_err());
        assert!(err.contains("neither a checkpoint"), "{err}");
        let err = format!("{:#}", resolve_members(&[]).unwrap_err());
        assert!(err.contains("no members"), "{err}");
    }

    #[test]
    fn the_mean_is_taken_per_value_and_refuses_mismatched_members() {
        let mut mean = ProbabilityMean::new();
        let a = Path::new("a");
        mean.add(&[0.9, 0.1, 0.2, 0.8], 2, a).unwrap();
        mean.add(&[0.5, 0.5, 0.6, 0.4], 2, a).unwrap();
        mean.add(&[0.1, 0.9, 0.1, 0.9], 2, a).unwrap();
        let err = mean.add(&[1.0, 0.0, 0.0], 3, Path::new("m3")).unwrap_err();
        assert!(err.to_string().contains("m3 has 3 classes"), "{err}");
        let err = mean.add(&[1.0, 0.0], 2, Path::new("short")).unwrap_err();
        assert!(err.to_string().contains("short scored 2 values"), "{err}");
        let got = mean.finish();
        let want = [0.5, 0.5, 0.3, 0.7];
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?}");
        }
    }
}
