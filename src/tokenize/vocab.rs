//! `vocab.txt` vocabularies (one token per line, the line number is the id) and detection of which
//! tokenizer a vocabulary belongs to.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{is_special_name, resolve_specials, SpecialTokens};

/// Which tokenizer a `vocab.txt` implies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// All 4^k k-mers over ACGT and no single bases: DNABERT's sliding window.
    OverlappingKmer { k: usize },
    /// All 4^k k-mers plus single bases (used for N and the tail): Nucleotide Transformer.
    NonOverlappingKmer { k: usize },
    /// Only single bases.
    SingleNucleotide,
}

/// An ordered token list with its reverse index and special ids.
#[derive(Clone, Debug)]
pub(crate) struct Vocab {
    tokens: Vec<String>,
    index: HashMap<String, u32>,
    specials: SpecialTokens,
    /// The file the tokens came from, or a label for built-in vocabularies, for error messages.
    origin: String,
}

impl Vocab {
    /// Builds a vocabulary; duplicate tokens and missing specials are errors naming `origin`.
    pub(crate) fn from_tokens(tokens: Vec<String>, origin: &str) -> Result<Self> {
        let mut index = HashMap::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            if let Some(first) = index.insert(token.clone(), id as u32) {
                bail!(
                    "{origin}: line {}: token {token:?} already appears on line {}",
                    id + 1,
                    first + 1
                );
            }
        }
        let specials = resolve_specials(|t| index.get(t).copied(), Path::new(origin))?;
        Ok(Self {
            tokens,
            index,
            specials,
            origin: origin.to_string(),
        })
    }

    /// Reads a `vocab.txt`. Trailing blank lines are ignored; a blank line inside would shift every
    /// later id, so it is an error.
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut tokens: Vec<String> = text
            .lines()
            .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
            .collect();
        while tokens.last().is_some_and(|t| t.is_empty()) {
            tokens.pop();
        }
        if tokens.is_empty() {
            bail!("{}: the vocabulary is empty", path.display());
        }
        if let Some(line) = tokens.iter().position(|t| t.trim().is_empty()) {
            bail!("{}: line {}: blank token", path.display(), line + 1);
        }
        Self::from_tokens(tokens, &path.display().to_string())
    }

    /// Writes the tokens one per line, atomically.
    pub(crate) fn write(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_atomic_with(path, |w| {
            for token in &self.tokens {
                writeln!(w, "{token}")?;
            }
            Ok(())
        })
    }

    pub(crate) fn id(&self, token: &str) -> Option<u32> {
        self.index.get(token).copied()
    }

    pub(crate) fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub(crate) fn tokens(&self) -> &[String] {
        &self.tokens
    }

    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
    }

    pub(crate) fn specials(&self) -> SpecialTokens {
        self.specials
    }

    /// Classifies the non-special tokens: k-mers of one length over ACGT (all 4^k of them) and/or
    /// single bases. Anything else is an error naming the line.
    pub(crate) fn detect_kind(&self) -> Result<VocabKind> {
        let mut kmer_len: Option<(usize, usize)> = None; // (k, line of the first k-mer)
        let mut kmers = 0usize;
        let mut singles = Vec::new();
        for (line, token) in self.tokens.iter().enumerate().map(|(i, t)| (i + 1, t)) {
            if is_special_name(token) {
                continue;
            }
            if token.len() == 1 && "ACGTN".contains(token.as_str()) {
                singles.push(token.as_str());
            } else if token.len() > 1 && token.bytes().all(|b| b"ACGT".contains(&b)) {
                match kmer_len {
                    None => kmer_len = Some((token.len(), line)),
                    Some((k, first)) if k != token.len() => bail!(
                        "{}: line {line}: k-mer {token:?} has length {}, but line {first} has a {k}-mer",
                        self.origin,
                        token.len()
                    ),
                    Some(_) => {}
                }
                kmers += 1;
            } else {
                bail!(
                    "{}: line {line}: token {token:?} is neither a special token ([X] or <x>), \
                     a k-mer over ACGT nor a single base",
                    self.origin
                );
            }
        }
        let missing_bases: Vec<&str> = ["A", "C", "G", "T"]
            .into_iter()
            .filter(|b| !singles.contains(b))
            .collect();
        match kmer_len {
            Some((k, _)) => {
                let expected = 4usize.checked_pow(k as u32).unwrap_or(usize::MAX);
                if kmers != expected {
                    bail!(
                        "{}: has {kmers} {k}-mers, a k-mer vocabulary needs all {expected}",
                        self.origin
                    );
                }
                if singles.is_empty() {
                    Ok(VocabKind::OverlappingKmer { k })
                } else if missing_bases.is_empty() {
                    Ok(VocabKind::NonOverlappingKmer { k })
                } else {
                    bail!(
                        "{}: has {k}-mers and single bases but lacks {}",
                        self.origin,
                        missing_bases.join(", ")
                    )
                }
            }
            None if !singles.is_empty() && missing_bases.is_empty() => {
                Ok(VocabKind::SingleNucleotide)
            }
            None => bail!(
                "{}: no k-mers and not all single bases (lacks {})",
                self.origin,
                missing_bases.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

    fn vocab_of(extra: &[&str]) -> Result<Vocab> {
        let tokens = SPECIALS
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        Vocab::from_tokens(tokens, "test vocab.txt")
    }

    fn all_kmers(k: usize) -> Vec<String> {
        (0..k).fold(vec![String::new()], |acc, _| {
            acc.iter()
                .flat_map(|p| "ACGT".chars().map(move |c| format!("{p}{c}")))
                .collect()
        })
    }

    #[test]
    fn detects_each_kind() {
        let k2 = all_kmers(2);
        let k2: Vec<&str> = k2.iter().map(String::as_str).collect();
        assert_eq!(
            vocab_of(&k2).unwrap().detect_kind().unwrap(),
            VocabKind::OverlappingKmer { k: 2 }
        );
        let mut with_bases = k2.clone();
        with_bases.extend(["A", "C", "G", "T", "N"]);
        assert_eq!(
            vocab_of(&with_bases).unwrap().detect_kind().unwrap(),
            VocabKind::NonOverlappingKmer { k: 2 }
        );
        assert_eq!(
            vocab_of(&["A", "C", "G", "T"])
                .unwrap()
                .detect_kind()
                .unwrap(),
            VocabKind::SingleNucleotide
        );
    }

    #[test]
    fn nucleotide_transformer_special_names_are_recognised() {
        let mut tokens: Vec<String> = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        tokens.extend(all_kmers(3));
        tokens.extend(["A", "T", "C", "G", "N"].map(String::from));
        let v = Vocab::from_tokens(tokens, "nt vocab.txt").unwrap();
        assert_eq!(
            v.specials(),
            SpecialTokens {
                unk: 0,
                pad: 1,
                mask: 2,
                cls: 3,
                sep: 4
            }
        );
        assert_eq!(
            v.detect_kind().unwrap(),
            VocabKind::NonOverlappingKmer { k: 3 }
        );
    }

    #[test]
    fn bad_vocabularies_give_errors_naming_the_problem() {
        let err = vocab_of(&["A", "C", "A"]).unwrap_err().to_string();
        assert!(err.contains("line 8") && err.contains("line 6"), "{err}");

        let err = vocab_of(&["AC", "ACG"])
            .unwrap()
            .detect_kind()
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 7") && err.contains("length 3"), "{err}");

        let err = vocab_of(&["AC", "GT"])
            .unwrap()
            .detect_kind()
            .unwrap_err()
            .to_string();
        assert!(err.contains("has 2 2-mers") && err.contains("16"), "{err}");

        let err = vocab_of(&["A", "hello"])
            .unwrap()
            .detect_kind()
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 7") && err.contains("hello"), "{err}");

        let err = vocab_of(&["A", "C", "G"])
            .unwrap()
            .detect_kind()
            .unwrap_err()
            .to_string();
        assert!(err.contains("lacks T"), "{err}");

        let tokens = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "A"]
            .map(String::from)
            .to_vec();
        let err = Vocab::from_tokens(tokens, "x/vocab.txt")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x/vocab.txt") && err.contains("[MASK]"),
            "{err}"
        );
    }

    #[test]
    fn read_rejects_inner_blank_lines_and_accepts_crlf() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.txt");
        std::fs::write(
            &path,
            "[PAD]\r\n[UNK]\r\n[CLS]\r\n[SEP]\r\n[MASK]\r\nA\r\nC\r\nG\r\nT\r\n\r\n",
        )
        .unwrap();
        let v = Vocab::read(&path).unwrap();
        assert_eq!(v.len(), 9);
        assert_eq!(v.id("T"), Some(8));

        std::fs::write(&path, "[PAD]\n[UNK]\n\n[CLS]\n[SEP]\n[MASK]\nA\n").unwrap();
        let err = Vocab::read(&path).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("vocab.txt"), "{err}");
    }
}
