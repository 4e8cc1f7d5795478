//! Files to validated records to train/dev/test splits.
//!
//! Everything downstream (tokenizers, batching, training) trusts that a [`Record`] holds an
//! upper-case A/C/G/T/N sequence, so all checking happens here, and every problem is reported with
//! the file, line and (where it helps) column, so a user can fix the input without a debugger.

mod bed;
mod read;
pub mod similarity;
mod split;
mod vcf;

use std::fmt;
use std::path::{Path, PathBuf};

pub use bed::{read_bed_regions, read_genome_regions, GenomeRegion};
pub use read::read_records;
pub use split::{load_splits, read_split_csv, split_records, write_records_csv, write_split_csv};
pub use vcf::{read_variant_windows, VariantWindows};

/// One labelled (or, for prediction, unlabelled) DNA sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    /// Upper-case, only `A`, `C`, `G`, `T`, `N`.
    pub seq: String,
    pub label: Option<usize>,
    /// Known for BED regions and ids like `chr3:100-200`; needed by the chromosome split.
    pub chrom: Option<String>,
}

/// A problem with an input file, located as precisely as the format allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError {
    /// Empty when the problem is not tied to a file (e.g. splitting records built in memory).
    pub path: PathBuf,
    /// 1-based physical line of the file.
    pub line: Option<usize>,
    /// 1-based column (for CSV/TSV: position of the character within the sequence field).
    pub column: Option<usize>,
    pub message: String,
}

impl DataError {
    pub(crate) fn new(path: &Path, message: impl Into<String>) -> Self {
        DataError {
            path: path.to_path_buf(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    pub(crate) fn at(path: &Path, line: usize, message: impl Into<String>) -> Self {
        DataError {
            line: Some(line),
            ..DataError::new(path, message)
        }
    }

    pub(crate) fn at_column(
        path: &Path,
        line: usize,
        column: usize,
        msg: impl Into<String>,
    ) -> Self {
        DataError {
            column: Some(column),
            ..DataError::at(path, line, msg)
        }
    }
}

impl fmt::Display for DataError {
    /// `path:line:column: message`, the form editors and terminals turn into a jump target.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut prefix = String::new();
        if !self.path.as_os_str().is_empty() {
            prefix = format!("{}:", self.path.display());
        }
        for n in [self.line, self.column].into_iter().flatten() {
            prefix.push_str(&format!("{n}:"));
        }
        if prefix.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{prefix} {}", self.message)
        }
    }
}

impl std::error::Error for DataError {}

/// Whether every record must carry a label: training and evaluation need one, prediction does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelPolicy {
    Required,
    Optional,
}

/// How to read an input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    /// Header name of the sequence column in CSV/TSV (matched case-insensitively).
    pub sequence_column: String,
    /// Header name of the label column in CSV/TSV (matched case-insensitively).
    pub label_column: String,
    /// Drop records with invalid sequences (counted in [`Dataset::skipped`]) instead of failing.
    pub skip_invalid: bool,
    /// Read IUPAC ambiguity codes (R, Y, S, W, K, M, B, D, H, V) as N instead of failing: the
    /// few such bases in a genome assembly or a consensus sequence then do not reject the record.
    pub ambiguous_as_n: bool,
    pub labels: LabelPolicy,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            sequence_column: "sequence".into(),
            label_column: "label".into(),
            skip_invalid: false,
            ambiguous_as_n: false,
            labels: LabelPolicy::Required,
        }
    }
}

/// The records read from one input, plus how many were dropped by `skip_invalid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub records: Vec<Record>,
    pub skipped: usize,
}

/// The IUPAC codes for two or more bases, N aside.
const IUPAC_AMBIGUOUS: &str = "RYSWKMBDHV";

/// Checks the DNA alphabet and upper-cases.
///
/// Only `A`, `C`, `G`, `T`, `N` (any case) pass, and with `ambiguous_as_n` the IUPAC ambiguity
/// codes too, as `N`; the error gives the 0-based character offset and the offending character.
/// An empty string passes here; readers reject empty sequences themselves.
pub fn validate_sequence(seq: &str, ambiguous_as_n: bool) -> Result<String, (usize, char)> {
    let mut out = String::with_capacity(seq.len());
    for (i, c) in seq.chars().enumerate() {
        match c.to_ascii_uppercase() {
            u @ ('A' | 'C' | 'G' | 'T' | 'N') => out.push(u),
            u if ambiguous_as_n && IUPAC_AMBIGUOUS.contains(u) => out.push('N'),
            _ => return Err((i, c)),
        }
    }
    Ok(out)
}

/// What an error about the letter `c` tells the user is allowed, with the way out when `c` is an
/// IUPAC code.
pub(crate) fn allowed_letters(c: char) -> &'static str {
    if IUPAC_AMBIGUOUS.contains(c.to_ascii_uppercase()) {
        "allowed: A, C, G, T, N; --ambiguous-as-n reads IUPAC codes as N"
    } else {
        "allowed: A, C, G, T, N"
    }
}

/// Reverse complement; keeps case, and complements IUPAC ambiguity codes so soft-masked or
/// ambiguous genome sequence survives the round trip. Other characters are kept as they are.
pub fn reverse_complement(seq: &str) -> String {
    seq.chars()
        .rev()
        .map(|c| {
            let upper = match c.to_ascii_uppercase() {
                'A' => 'T',
                'T' | 'U' => 'A',
                'C' => 'G',
                'G' => 'C',
                'R' => 'Y',
                'Y' => 'R',
                'K' => 'M',
                'M' => 'K',
                'B' => 'V',
                'V' => 'B',
                'D' => 'H',
                'H' => 'D',
                other => other, // N, S, W are their own complements
            };
            if c.is_ascii_lowercase() {
                upper.to_ascii_lowercase()
            } else {
                upper
            }
        })
        .collect()
}

/// Strand augmentation: the originals, then a reverse-complemented copy of each (id + `/rc`).
///
/// Most regulatory signals are strand-agnostic, so the copies double the training data for free.
pub fn with_reverse_complements(records: &[Record]) -> Vec<Record> {
    let mut out = records.to_vec();
    out.extend(records.iter().map(|r| Record {
        id: format!("{}/rc", r.id),
        seq: reverse_complement(&r.seq),
        label: r.label,
        chrom: r.chrom.clone(),
    }));
    out
}

/// How [`split_records`] assigns records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitStrategy {
    /// Seeded shuffle, then cut by the fractions.
    Random,
    /// Seeded shuffle within each class, so every split keeps the class proportions.
    Stratified,
    /// Whole chromosomes are held out, so no split sees a neighbouring region of another
    /// (the usual leak in genomic benchmarks).
    Chromosome,
    /// Records sharing a `kmer`-long stretch (either strand), directly or through others, stay
    /// in one split, so no held-out sequence repeats a piece of a training one.
    Similarity,
}

/// Parameters of [`split_records`].
#[derive(Debug, Clone, PartialEq)]
pub struct SplitConfig {
    pub strategy: SplitStrategy,
    pub dev_fraction: f64,
    pub test_fraction: f64,
    pub seed: u64,
    /// Chromosome strategy only: chromosomes held out for dev (empty: chosen by seed).
    pub dev_chroms: Vec<String>,
    /// Chromosome strategy only: chromosomes held out for test (empty: chosen by seed).
    pub test_chroms: Vec<String>,
    /// Similarity strategy only: the length of the shared stretch that links two records.
    pub kmer: usize,
    /// Cross-validation: test is this fold of a seeded partition (by the strategy), and dev
    /// `dev_fraction` of the other records; `test_fraction` and the chromosome lists are unused.
    pub fold: Option<Fold>,
}

/// One fold of a k-fold partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fold {
    /// 0-based, below `count`.
    pub index: usize,
    pub count: usize,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            strategy: SplitStrategy::Stratified,
            dev_fraction: 0.1,
            test_fraction: 0.1,
            seed: 42,
            dev_chroms: Vec::new(),
            test_chroms: Vec::new(),
            kmer: 31,
            fold: None,
        }
    }
}

/// Train, dev and test records; within each split records keep their input order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    pub train: Vec<Record>,
    pub dev: Vec<Record>,
    pub test: Vec<Record>,
}

/// Where [`load_splits`] got its splits from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitSource {
    /// A directory with `train`, `dev` and `test` files, used as given.
    GueDirectory,
    /// One file split by [`split_records`].
    SplitFromFile,
}

/// Chromosome of an id shaped like `chr3:100-200`, optionally followed by a strand `(+)`/`(-)`.
///
/// Restricted to the `chr` prefix so that default ids like `train:17` are never mistaken for one.
pub(crate) fn chrom_from_id(id: &str) -> Option<String> {
    let (chrom, range) = id.rsplit_once(':')?;
    let has_prefix = chrom.len() > 3 && chrom[..3].eq_ignore_ascii_case("chr");
    let range = ["(+)", "(-)", "(.)"]
        .iter()
        .find_map(|s| range.strip_suffix(s))
        .unwrap_or(range);
    let (start, end) = range.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (has_prefix && digits(start) && digits(end)).then(|| chrom.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_complement_of_hand_written_example() {
        assert_eq!(reverse_complement("AACGTN"), "NACGTT");
        assert_eq!(reverse_complement("GATTACA"), "TGTAATC");
        assert_eq!(reverse_complement("acgT"), "Acgt");
        assert_eq!(reverse_complement(""), "");
        let s = "ACGGTTNACAGT";
        assert_eq!(reverse_complement(&reverse_complement(s)), s);
    }

    #[test]
    fn augmentation_appends_rc_copies() {
        let recs = vec![Record {
            id: "a".into(),
            seq: "AAC".into(),
            label: Some(1),
            chrom: Some("chr1".into()),
        }];
        let out = with_reverse_complements(&recs);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], recs[0]);
        assert_eq!(out[1].id, "a/rc");
        assert_eq!(out[1].seq, "GTT");
        assert_eq!(out[1].label, Some(1));
        assert_eq!(out[1].chrom.as_deref(), Some("chr1"));
    }

    #[test]
    fn validate_uppercases_and_locates_bad_character() {
        assert_eq!(validate_sequence("acgtN", false).unwrap(), "ACGTN");
        assert_eq!(validate_sequence("ACXG", false), Err((2, 'X')));
        assert_eq!(validate_sequence("AC-G", false), Err((2, '-')));
        assert_eq!(validate_sequence("A G", false), Err((1, ' ')));
        assert_eq!(validate_sequence("ACRg", false), Err((2, 'R')));
    }

    #[test]
    fn ambiguous_as_n_turns_every_iupac_code_and_only_those_into_n() {
        assert_eq!(
            validate_sequence("aRyswkmbdhvT", true).unwrap(),
            "ANNNNNNNNNNT"
        );
        // U, gaps and other letters stay errors: they are not ambiguity codes.
        for (seq, at, c) in [("ACU", 2, 'U'), ("R-A", 1, '-'), ("RXA", 1, 'X')] {
            assert_eq!(validate_sequence(seq, true), Err((at, c)));
        }
        assert!(allowed_letters('k').contains("--ambiguous-as-n"));
        assert!(!allowed_letters('X').contains("--ambiguous-as-n"));
    }

    #[test]
    fn chrom_parsed_only_from_region_ids() {
        assert_eq!(chrom_from_id("chr3:100-200").as_deref(), Some("chr3"));
        assert_eq!(chrom_from_id("chrX:5-9(-)").as_deref(), Some("chrX"));
        assert_eq!(chrom_from_id("dev:17"), None);
        assert_eq!(chrom_from_id("chr1:17"), None);
        assert_eq!(chrom_from_id("3:100-200"), None);
        assert_eq!(chrom_from_id("chr2:a-200"), None);
    }

    #[test]
    fn display_omits_absent_parts() {
        let e = DataError::at_column(Path::new("x.csv"), 3, 7, "bad");
        assert_eq!(e.to_string(), "x.csv:3:7: bad");
        let e = DataError::new(Path::new("x.csv"), "bad");
        assert_eq!(e.to_string(), "x.csv: bad");
        let e = DataError::new(Path::new(""), "bad");
        assert_eq!(e.to_string(), "bad");
    }
}
