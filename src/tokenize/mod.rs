//! Tokenizers: turn an upper-case DNA sequence (A, C, G, T, N) into the token ids a model was trained
//! with, as `[CLS] tokens.. [SEP]`.
//!
//! Four kinds share one [`Tokenizer`] trait: overlapping k-mers (DNABERT), non-overlapping k-mers
//! (Nucleotide Transformer), single nucleotides, and BPE from a Hugging Face `tokenizer.json`
//! (DNABERT-2). [`load_tokenizer`] picks the right one from a model directory, so special-token ids
//! always come from the model's own files.

mod bpe;
mod kmer;
mod vocab;

use std::path::Path;

use anyhow::{Context, Result};

pub use bpe::{train_bpe, BpeTokenizer};
pub use kmer::{KmerTokenizer, SingleNucleotideTokenizer};
pub use vocab::VocabKind;

/// Ids of the five special tokens every dnatune tokenizer must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub pad: u32,
    pub mask: u32,
}

impl SpecialTokens {
    /// Whether `id` is one of the special tokens (such ids cover no bases and are never masked for MLM).
    pub fn contains(&self, id: u32) -> bool {
        [self.unk, self.cls, self.sep, self.pad, self.mask].contains(&id)
    }
}

/// A DNA tokenizer. Implementations are immutable, so one instance can be shared across threads.
pub trait Tokenizer: Send + Sync {
    /// Ids of one upper-case ACGTN sequence as `[CLS] tokens.. [SEP]` (`<cls> tokens..` for the
    /// Nucleotide Transformer's non-overlapping k-mers, which have no end token). When `max_len`
    /// is `Some(n)` the result has at most `n` ids: the specials are kept and tokens are dropped
    /// from the end (for `n` below the specials' count only the first `n` of them remain).
    fn encode(&self, seq: &str, max_len: Option<usize>) -> Vec<u32>;
    /// For every id of `encode(seq, None)`: the `[start, end)` base span it covers, `None` for special
    /// tokens. Used to map token importance back onto bases.
    fn token_spans(&self, seq: &str) -> Vec<Option<(usize, usize)>>;
    /// Number of ids, special tokens included (the embedding table needs at least this many rows).
    fn vocab_size(&self) -> usize;
    fn special_tokens(&self) -> SpecialTokens;
    fn id_to_token(&self, id: u32) -> Option<String>;
    fn token_to_id(&self, token: &str) -> Option<u32>;
    /// One line for logs and reports, e.g. "BPE from tokenizer.json, 4096 tokens".
    fn describe(&self) -> String;
    /// Writes `tokenizer.json` or `vocab.txt` into `dir` (atomically) so that [`load_tokenizer`]`(dir)`
    /// reloads a tokenizer giving identical encodings.
    fn save(&self, dir: &Path) -> Result<()>;
}

/// Loads the tokenizer of a model directory: `tokenizer.json` means BPE (or any model the `tokenizers`
/// crate runs); otherwise `vocab.txt`, whose contents decide between overlapping k-mer, non-overlapping
/// k-mer and single nucleotide (see [`VocabKind`]). A WordPiece `tokenizer.json` next to a `vocab.txt`
/// (as converted k-mer DNABERT checkpoints ship) defers to the `vocab.txt`, because WordPiece would
/// split a raw DNA string wrongly.
pub fn load_tokenizer(model_dir: &Path) -> Result<Box<dyn Tokenizer>> {
    let json = model_dir.join("tokenizer.json");
    let vocab_txt = model_dir.join("vocab.txt");
    if json.is_file() {
        let bpe = BpeTokenizer::from_file(&json)?;
        if !(bpe.is_wordpiece() && vocab_txt.is_file()) {
            return Ok(Box::new(bpe));
        }
    }
    if vocab_txt.is_file() {
        return load_vocab_tokenizer(&vocab_txt);
    }
    anyhow::bail!(
        "{}: no tokenizer.json or vocab.txt found in the model directory",
        model_dir.display()
    )
}

/// Loads a `vocab.txt` and builds the tokenizer kind its tokens imply.
pub fn load_vocab_tokenizer(path: &Path) -> Result<Box<dyn Tokenizer>> {
    let vocab = vocab::Vocab::read(path)?;
    let kind = vocab
        .detect_kind()
        .with_context(|| format!("{}: cannot tell the tokenizer kind", path.display()))?;
    let origin = path.display().to_string();
    Ok(match kind {
        VocabKind::OverlappingKmer { k } => {
            Box::new(KmerTokenizer::from_vocab(vocab, k, true, origin))
        }
        VocabKind::NonOverlappingKmer { k } => {
            Box::new(KmerTokenizer::from_vocab(vocab, k, false, origin))
        }
        VocabKind::SingleNucleotide => {
            Box::new(SingleNucleotideTokenizer::from_vocab(vocab, origin))
        }
    })
}

/// Accepted names for each special role: the BERT bracket names first, then the Nucleotide
/// Transformer names (which call the end-of-sequence token `<eos>`).
const SPECIAL_NAMES: [(&str, &[&str]); 5] = [
    ("unk", &["[UNK]", "<unk>"]),
    ("cls", &["[CLS]", "<cls>"]),
    ("sep", &["[SEP]", "<eos>", "<sep>"]),
    ("pad", &["[PAD]", "<pad>"]),
    ("mask", &["[MASK]", "<mask>"]),
];

/// Finds the five special ids with `lookup`; the error names `file` and the missing token.
fn resolve_specials(lookup: impl Fn(&str) -> Option<u32>, file: &Path) -> Result<SpecialTokens> {
    let mut ids = [0u32; 5];
    for (slot, (_, names)) in ids.iter_mut().zip(SPECIAL_NAMES) {
        *slot = names.iter().find_map(|n| lookup(n)).with_context(|| {
            format!(
                "{}: missing special token {} (none of {})",
                file.display(),
                names[0],
                names.join(", ")
            )
        })?;
    }
    let [unk, cls, sep, pad, mask] = ids;
    Ok(SpecialTokens {
        unk,
        cls,
        sep,
        pad,
        mask,
    })
}

/// Whether a vocabulary entry looks like a special token (`[X]` or `<x>`) rather than DNA.
fn is_special_name(token: &str) -> bool {
    let bracketed = |open, close| token.starts_with(open) && token.ends_with(close);
    token.len() > 2 && (bracketed('[', ']') || bracketed('<', '>'))
}

/// The special tokens around a sequence's tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// `[CLS] tokens [SEP]`: BERT, DNABERT, DNABERT-2.
    ClsSep,
    /// `<cls> tokens`, no end token: the Nucleotide Transformer (huggingface/transformers#22770
    /// made ESM's tokenizer leave `<eos>` out for it).
    ClsOnly,
}

impl Framing {
    /// The special ids of an empty sequence, in order.
    fn specials(self, s: SpecialTokens) -> Vec<u32> {
        match self {
            Framing::ClsSep => vec![s.cls, s.sep],
            Framing::ClsOnly => vec![s.cls],
        }
    }
}

/// The body framed by `framing`, cut so the whole has at most `max_len` ids: the specials are
/// kept (for a `max_len` below their count, only the first `max_len` of them).
fn wrap_ids(
    body: impl Iterator<Item = u32>,
    specials: SpecialTokens,
    max_len: Option<usize>,
    framing: Framing,
) -> Vec<u32> {
    let framed = framing.specials(specials);
    let n = max_len.unwrap_or(usize::MAX);
    if n < framed.len() {
        return framed[..n].to_vec();
    }
    let mut ids = vec![specials.cls];
    ids.extend(body.take(n - framed.len()));
    if framing == Framing::ClsSep {
        ids.push(specials.sep);
    }
    ids
}

/// Spans of the framed body, the specials covering no bases.
fn wrap_spans(
    body: impl Iterator<Item = (usize, usize)>,
    framing: Framing,
) -> Vec<Option<(usize, usize)>> {
    let mut spans = vec![None];
    spans.extend(body.map(Some));
    if framing == Framing::ClsSep {
        spans.push(None);
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokenizers of every kind, each with a fresh directory to save into.
    fn all_kinds() -> Vec<Box<dyn Tokenizer>> {
        let bpe_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("assets/tokenizers/dna-bpe-4096/tokenizer.json");
        vec![
            Box::new(KmerTokenizer::overlapping(3).unwrap()),
            Box::new(KmerTokenizer::overlapping(6).unwrap()),
            Box::new(KmerTokenizer::non_overlapping(6).unwrap()),
            Box::new(KmerTokenizer::non_overlapping(2).unwrap()),
            Box::new(SingleNucleotideTokenizer::new()),
            Box::new(BpeTokenizer::from_file(&bpe_path).unwrap()),
        ]
    }

    #[test]
    fn save_then_load_gives_identical_encodings_for_every_kind() {
        let seqs = [
            "ACGTACGTTGCANNACGTAGGCTA",
            "GGGCCCAAATTTN",
            "AC",
            "",
            "TGACCACCCCTCTTTTCTAGAGTTCTGCCTCGCTTCCCGGCGCGGTCGCAGCCCTCAGCCCACTTAGG",
        ];
        for tok in all_kinds() {
            let dir = tempfile::tempdir().unwrap();
            tok.save(dir.path()).unwrap();
            let back = load_tokenizer(dir.path()).unwrap();
            assert_eq!(back.vocab_size(), tok.vocab_size(), "{}", tok.describe());
            assert_eq!(back.special_tokens(), tok.special_tokens());
            for seq in seqs {
                assert_eq!(
                    back.encode(seq, None),
                    tok.encode(seq, None),
                    "{} on {seq}",
                    tok.describe()
                );
                assert_eq!(back.encode(seq, Some(5)), tok.encode(seq, Some(5)));
                assert_eq!(back.token_spans(seq), tok.token_spans(seq));
            }
            for id in 0..tok.vocab_size() as u32 {
                assert_eq!(back.id_to_token(id), tok.id_to_token(id));
            }
        }
    }

    #[test]
    fn encode_and_spans_agree_and_truncation_keeps_the_specials() {
        let seq = "ACGTTGCAAGGCTTNACG";
        for tok in all_kinds() {
            let sp = tok.special_tokens();
            let ids = tok.encode(seq, None);
            let spans = tok.token_spans(seq);
            assert_eq!(ids.len(), spans.len(), "{}", tok.describe());
            // Only the Nucleotide Transformer's k-mers go without an end token.
            let nt = tok.describe().contains("Nucleotide Transformer");
            let framed = tok.encode("", None);
            assert_eq!(
                framed,
                if nt {
                    vec![sp.cls]
                } else {
                    vec![sp.cls, sp.sep]
                }
            );
            assert_eq!(ids[0], sp.cls);
            assert_eq!(*ids.last().unwrap() == sp.sep, !nt, "{}", tok.describe());
            for (id, span) in ids.iter().zip(&spans) {
                let special = *id == sp.cls || *id == sp.sep;
                assert_eq!(span.is_none(), special, "{}: id {id}", tok.describe());
            }
            let ends = framed.len() - 1;
            for n in 0..ids.len() + 3 {
                let cut = tok.encode(seq, Some(n));
                assert_eq!(
                    cut.len(),
                    n.min(ids.len()),
                    "{} max_len {n}",
                    tok.describe()
                );
                if n < framed.len() {
                    assert_eq!(cut, framed[..n]);
                } else {
                    assert_eq!(cut[0], sp.cls);
                    assert_eq!(cut[cut.len() - ends..], framed[1..]);
                    assert_eq!(cut[1..cut.len() - ends], ids[1..cut.len() - ends]);
                }
            }
        }
    }

    #[test]
    fn load_tokenizer_errors_name_the_directory_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_tokenizer(dir.path()).err().unwrap().to_string();
        assert!(err.contains("no tokenizer.json or vocab.txt"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");

        std::fs::write(
            dir.path().join("vocab.txt"),
            "[PAD]\n[UNK]\n[CLS]\n[SEP]\nA\nC\nG\nT\n",
        )
        .unwrap();
        let err = format!("{:#}", load_tokenizer(dir.path()).err().unwrap());
        assert!(err.contains("vocab.txt") && err.contains("[MASK]"), "{err}");
    }

    #[test]
    fn wordpiece_tokenizer_json_defers_to_vocab_txt() {
        let dir = tempfile::tempdir().unwrap();
        let kmer = KmerTokenizer::overlapping(3).unwrap();
        kmer.save(dir.path()).unwrap();
        let vocab: serde_json::Map<String, serde_json::Value> = (0..kmer.vocab_size() as u32)
            .map(|i| (kmer.id_to_token(i).unwrap(), i.into()))
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab}
        });
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        let tok = load_tokenizer(dir.path()).unwrap();
        assert_eq!(tok.encode("ACGTA", None), kmer.encode("ACGTA", None));
        assert!(tok.describe().contains("3-mer from") && tok.describe().contains("vocab.txt"));
    }
}
