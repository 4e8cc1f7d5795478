//! BPE (DNABERT-2 style) through Hugging Face's `tokenizers` crate, and training a BPE vocabulary.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use super::{resolve_specials, wrap_ids, wrap_spans, Framing, SpecialTokens, Tokenizer};

/// Every character a sequence may hold; encoding it at load time proves later encodes cannot fail.
const ALPHABET_PROBE: &str = "ACGTN";

/// A `tokenizer.json` tokenizer. Its own post-processing template is bypassed: dnatune adds `[CLS]`
/// and `[SEP]` itself so truncation and spans work the same for every tokenizer kind.
#[derive(Clone)]
pub struct BpeTokenizer {
    inner: tokenizers::Tokenizer,
    specials: SpecialTokens,
    origin: String,
}

impl std::fmt::Debug for BpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl BpeTokenizer {
    /// Loads a Hugging Face `tokenizer.json`; errors name the file (unreadable, not a tokenizer, a
    /// missing special token, or unable to encode A, C, G, T, N).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: not a usable tokenizer.json: {e}", path.display()))?;
        Self::from_inner(inner, path, path.display().to_string())
    }

    fn from_inner(mut inner: tokenizers::Tokenizer, file: &Path, origin: String) -> Result<Self> {
        // Padding or truncation stored in the file would add or drop ids behind dnatune's back.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("{}: {e}", file.display()))?;
        let specials = resolve_specials(|t| inner.token_to_id(t), file)?;
        inner
            .encode(ALPHABET_PROBE, false)
            .map_err(|e| anyhow!("{}: cannot encode {ALPHABET_PROBE}: {e}", file.display()))?;
        Ok(Self {
            inner,
            specials,
            origin,
        })
    }

    /// Whether the file holds a WordPiece model, which cannot split raw DNA by itself.
    pub(crate) fn is_wordpiece(&self) -> bool {
        matches!(self.inner.get_model(), ModelWrapper::WordPiece(_))
    }

    /// Body tokens as (id, start, end). Load-time probing rules out encoding errors for ACGTN; any
    /// other character that still trips the library falls back to one `[UNK]` per byte.
    fn pieces(&self, seq: &str) -> Vec<(u32, usize, usize)> {
        match self.inner.encode_char_offsets(seq, false) {
            Ok(enc) => enc
                .get_ids()
                .iter()
                .zip(enc.get_offsets())
                .map(|(&id, &(s, e))| (id, s, e))
                .collect(),
            Err(_) => (0..seq.len())
                .map(|i| (self.specials.unk, i, i + 1))
                .collect(),
        }
    }
}

impl Tokenizer for BpeTokenizer {
    fn encode(&self, seq: &str, max_len: Option<usize>) -> Vec<u32> {
        wrap_ids(
            self.pieces(seq).into_iter().map(|p| p.0),
            self.specials,
            max_len,
            Framing::ClsSep,
        )
    }

    fn token_spans(&self, seq: &str) -> Vec<Option<(usize, usize)>> {
        wrap_spans(
            self.pieces(seq).into_iter().map(|(_, s, e)| (s, e)),
            Framing::ClsSep,
        )
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn special_tokens(&self) -> SpecialTokens {
        self.specials
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn describe(&self) -> String {
        let kind = match self.inner.get_model() {
            ModelWrapper::BPE(_) => "BPE",
            ModelWrapper::WordPiece(_) => "WordPiece",
            ModelWrapper::WordLevel(_) => "WordLevel",
            ModelWrapper::Unigram(_) => "Unigram",
        };
        format!("{kind} from {}, {} tokens", self.origin, self.vocab_size())
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        let text = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow!("cannot serialise the tokenizer for {}: {e}", path.display()))?;
        crate::fsutil::write_atomic(&path, text.as_bytes())
    }
}

/// Trains a DNABERT-2-style BPE vocabulary of `vocab_size` tokens: `[UNK]`0 `[CLS]`1 `[SEP]`2
/// `[PAD]`3 `[MASK]`4, then A C G T, then merges; whitespace pre-tokenizer and a `[CLS] $A [SEP]`
/// template, so the saved `tokenizer.json` also works from Python. Characters other than ACGT
/// (N runs, lower case is upper-cased first) split a sequence, so no merge spans them.
pub fn train_bpe(
    sequences: impl Iterator<Item = String> + Send,
    vocab_size: usize,
) -> Result<BpeTokenizer> {
    const SPECIALS: [&str; 5] = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"];
    if vocab_size < SPECIALS.len() + 4 {
        bail!(
            "BPE vocabulary size {vocab_size} is too small: it needs at least {} (5 special tokens and A, C, G, T)",
            SPECIALS.len() + 4
        );
    }
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .show_progress(false)
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(HashSet::from(['A', 'C', 'G', 'T']))
        .build()
        .into();
    let model = BPE::builder()
        .unk_token(SPECIALS[0].to_string())
        .build()
        .map_err(|e| anyhow!("cannot build an empty BPE model: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(Whitespace {}));
    let template = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
        .map_err(|e| anyhow!("BPE template: {e}"))?
        .special_tokens(vec![("[CLS]", 1), ("[SEP]", 2)])
        .build()
        .context("BPE template")?;
    inner.with_post_processor(Some(template));
    let cleaned = sequences.map(|s| {
        s.bytes()
            .map(|b| match b.to_ascii_uppercase() {
                c @ (b'A' | b'C' | b'G' | b'T') => c as char,
                _ => ' ',
            })
            .collect::<String>()
    });
    inner
        .train(&mut trainer, cleaned)
        .map_err(|e| anyhow!("BPE training failed: {e}"))?;
    let label = format!("dnatune BPE training ({vocab_size} requested)");
    BpeTokenizer::from_inner(inner, Path::new(&label), "training".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn asset() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizers/dna-bpe-4096/tokenizer.json")
    }

    fn dev_sequences() -> Vec<String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/gue-tf0/dev.csv");
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap().to_string())
            .collect()
    }

    /// id -> token from the JSON itself, independent of the `tokenizers` crate.
    fn json_vocab() -> HashMap<u32, String> {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(asset()).unwrap()).unwrap();
        let mut map: HashMap<u32, String> = json["model"]["vocab"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(t, id)| (id.as_u64().unwrap() as u32, t.clone()))
            .collect();
        for added in json["added_tokens"].as_array().unwrap() {
            map.insert(
                added["id"].as_u64().unwrap() as u32,
                added["content"].as_str().unwrap().to_string(),
            );
        }
        map
    }

    #[test]
    fn shipped_bpe_encodes_dev_sequences_losslessly() {
        let tok = BpeTokenizer::from_file(&asset()).unwrap();
        let vocab = json_vocab();
        assert_eq!(tok.vocab_size(), vocab.len());
        assert_eq!(
            tok.special_tokens(),
            SpecialTokens {
                unk: 0,
                cls: 1,
                sep: 2,
                pad: 3,
                mask: 4
            }
        );
        assert!(tok.describe().starts_with("BPE from") && tok.describe().ends_with("4096 tokens"));
        let seqs = dev_sequences();
        assert_eq!(seqs.len(), 1000);
        for seq in &seqs {
            let ids = tok.encode(seq, None);
            assert_eq!((ids[0], *ids.last().unwrap()), (1, 2));
            let body: Vec<&str> = ids[1..ids.len() - 1]
                .iter()
                .map(|id| {
                    vocab
                        .get(id)
                        .map(String::as_str)
                        .expect("id outside the JSON vocab")
                })
                .collect();
            assert_eq!(body.concat(), *seq);
            assert!(
                ids.len() < seq.len() / 2,
                "BPE should compress: {} ids",
                ids.len()
            );
            let spans = tok.token_spans(seq);
            assert_eq!(spans.len(), ids.len());
            assert_eq!((spans[0], *spans.last().unwrap()), (None, None));
            let mut pos = 0;
            for (span, token) in spans[1..spans.len() - 1].iter().zip(&body) {
                let (s, e) = span.unwrap();
                assert_eq!(s, pos, "spans must tile the sequence");
                assert_eq!(&seq[s..e], *token);
                pos = e;
            }
            assert_eq!(pos, seq.len());
        }
    }

    #[test]
    fn n_becomes_unk_with_its_span() {
        let tok = BpeTokenizer::from_file(&asset()).unwrap();
        let ids = tok.encode("ACGTNACGT", None);
        let spans = tok.token_spans("ACGTNACGT");
        let n_at = spans.iter().position(|s| *s == Some((4, 5))).unwrap();
        assert_eq!(ids[n_at], 0);
    }

    #[test]
    fn missing_special_token_is_an_error_naming_the_file() {
        let text = std::fs::read_to_string(asset()).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .retain(|t| t["content"] != "[MASK]");
        json["model"]["vocab"]
            .as_object_mut()
            .unwrap()
            .remove("[MASK]");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let err = BpeTokenizer::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("[MASK]"),
            "{err}"
        );

        std::fs::write(&path, "{ not json").unwrap();
        let err = BpeTokenizer::from_file(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn trained_bpe_has_the_documented_layout_and_round_trips() {
        let seqs = dev_sequences();
        let tok = train_bpe(seqs.clone().into_iter().chain(["ACGNNNTT".into()]), 300).unwrap();
        let first: Vec<String> = (0..9).map(|i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(
            first,
            ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "A", "C", "G", "T"]
        );
        assert_eq!(tok.vocab_size(), 300);
        assert_eq!(tok.token_to_id("N"), None, "N must not enter the alphabet");
        let ids = tok.encode(&seqs[0], None);
        let body: String = ids[1..ids.len() - 1]
            .iter()
            .map(|&i| tok.id_to_token(i).unwrap())
            .collect();
        assert_eq!(body, seqs[0]);
        assert!(
            ids.len() < seqs[0].len() / 2,
            "merges should compress: {} ids",
            ids.len()
        );

        let dir = tempfile::tempdir().unwrap();
        tok.save(dir.path()).unwrap();
        let back = crate::tokenize::load_tokenizer(dir.path()).unwrap();
        assert_eq!(back.encode(&seqs[1], None), tok.encode(&seqs[1], None));
        // The template is stored too, so Python's tokenizer adds [CLS]/[SEP] the same way.
        let raw = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let with_template = raw.encode(seqs[1].as_str(), true).unwrap();
        assert_eq!(
            with_template.get_ids(),
            tok.encode(&seqs[1], None).as_slice()
        );

        assert!(train_bpe(std::iter::empty(), 8).is_err());
    }
}
