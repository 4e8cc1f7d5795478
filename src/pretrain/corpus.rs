//! The pre-training corpus: FASTA or one-sequence-per-line text (optionally gzipped), cut at
//! anything that is not A/C/G/T (N runs, IUPAC codes), upper-cased (soft-masked repeats are real
//! sequence), tokenized, split into training and held-out streams, and cropped into windows.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::tokenize::Tokenizer;

/// Stretches of pure ACGT sequence, in file order.
pub fn read_corpus(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open corpus {}", path.display()))?;
    let name = path.to_string_lossy().to_lowercase();
    let reader: Box<dyn Read> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let base = name.trim_end_matches(".gz");
    let fasta = [".fa", ".fasta", ".fna"].iter().any(|e| base.ends_with(e));
    let mut stretches = Vec::new();
    let mut current = String::new();
    let flush = |current: &mut String, out: &mut Vec<String>| {
        for piece in current.split(|c: char| !matches!(c, 'A' | 'C' | 'G' | 'T')) {
            if !piece.is_empty() {
                out.push(piece.to_string());
            }
        }
        current.clear();
    };
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}:{}: cannot read line", path.display(), i + 1))?;
        let line = line.trim();
        if fasta && line.starts_with('>') {
            flush(&mut current, &mut stretches);
            continue;
        }
        if line.is_empty() {
            continue;
        }
        current.push_str(&line.to_ascii_uppercase());
        if !fasta {
            flush(&mut current, &mut stretches);
        }
    }
    flush(&mut current, &mut stretches);
    if stretches.is_empty() {
        bail!("{}: no A/C/G/T sequence found", path.display());
    }
    Ok(stretches)
}

/// Token streams for training and validation: tokenized stretches (without [CLS]/[SEP]) joined
/// by [SEP] in a seeded order.
pub struct TokenStreams {
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
    pub bases: usize,
}

/// Tokenizes `stretches` (in parallel) and sends a seeded `valid_fraction` of them to validation.
pub fn build_streams(
    stretches: &[String],
    tokenizer: &dyn Tokenizer,
    valid_fraction: f64,
    seed: u64,
) -> TokenStreams {
    let sep = tokenizer.special_tokens().sep;
    // The specials around a sequence: [CLS] first, and [SEP] last unless the tokenizer has no
    // end token (Nucleotide Transformer k-mers).
    let trailing = tokenizer.encode("", None).len() - 1;
    let tokens: Vec<Vec<u32>> = stretches
        .par_iter()
        .map(|s| {
            let ids = tokenizer.encode(s, None);
            ids[1..ids.len() - trailing].to_vec()
        })
        .collect();
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    order.shuffle(&mut rng);
    let n_valid = ((tokens.len() as f64) * valid_fraction).round() as usize;
    let join = |idx: &[usize]| {
        let mut out = Vec::new();
        for &i in idx {
            out.extend_from_slice(&tokens[i]);
            out.push(sep);
        }
        out
    };
    TokenStreams {
        valid: join(&order[..n_valid]),
        train: join(&order[n_valid..]),
        bases: stretches.iter().map(String::len).sum(),
    }
}

/// `len` tokens at a random offset `o`: `[CLS] stream[o ..] [SEP]`, or without an `end` token
/// `<cls> stream[o ..]` (the Nucleotide Transformer's framing).
pub fn random_window(
    stream: &[u32],
    len: usize,
    cls: u32,
    end: Option<u32>,
    rng: &mut StdRng,
) -> Vec<u32> {
    let body = (len - 1 - usize::from(end.is_some())).min(stream.len());
    let start = rng.random_range(0..=stream.len() - body);
    let mut w = Vec::with_capacity(body + 2);
    w.push(cls);
    w.extend_from_slice(&stream[start..start + body]);
    w.extend(end);
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fasta_is_cut_at_non_acgt_and_upper_cased() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.fa");
        std::fs::write(&path, ">a\nACGTNNac\ngtRAA\n>b\n\nTTTT\n").unwrap();
        assert_eq!(
            read_corpus(&path).unwrap(),
            vec!["ACGT", "ACGT", "AA", "TTTT"]
        );
        let txt = dir.path().join("c.txt");
        std::fs::write(&txt, "acgt\nGGNCC\n").unwrap();
        assert_eq!(read_corpus(&txt).unwrap(), vec!["ACGT", "GG", "CC"]);
        std::fs::write(&txt, "NNNN\n").unwrap();
        assert!(read_corpus(&txt).is_err());
    }

    #[test]
    fn streams_keep_every_token_whatever_the_framing() {
        // "ACGTAC" is 2 tokens of 3-mers, "GGGTT" 3 (GGG, T, T), under either framing; each
        // stretch is followed by one [SEP].
        let stretches = ["ACGTAC".to_string(), "GGGTT".to_string()];
        let dnabert = crate::tokenize::KmerTokenizer::overlapping(3).unwrap();
        let nt = crate::tokenize::KmerTokenizer::non_overlapping(3).unwrap();
        let streams = build_streams(&stretches, &nt, 0.0, 1);
        assert_eq!(streams.train.len(), 2 + 3 + 2);
        let sep = nt.special_tokens().sep;
        assert_eq!(streams.train.iter().filter(|&&t| t == sep).count(), 2);
        // Overlapping 3-mers: 4 and 3 tokens.
        assert_eq!(
            build_streams(&stretches, &dnabert, 0.0, 1).train.len(),
            4 + 3 + 2
        );
    }

    #[test]
    fn windows_are_framed_and_inside_the_stream() {
        let stream: Vec<u32> = (10..60).collect();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let w = random_window(&stream, 12, 1, Some(2), &mut rng);
            assert_eq!(w.len(), 12);
            assert_eq!((w[0], w[11]), (1, 2));
            assert!(w[1..11].windows(2).all(|p| p[1] == p[0] + 1), "{w:?}");
            let w = random_window(&stream, 12, 1, None, &mut rng);
            assert_eq!(w.len(), 12);
            assert_eq!(w[0], 1);
            assert!(w[1..].windows(2).all(|p| p[1] == p[0] + 1), "{w:?}");
        }
        let short = random_window(&stream[..3], 12, 1, Some(2), &mut rng);
        assert_eq!(short, vec![1, 10, 11, 12, 2]);
    }
}
